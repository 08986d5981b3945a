"""report.json and summary.md: what a run measured, for programs and for a person."""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from job.layout import RunLayout, atomic_write_bytes

REPORT_VERSION = 2  # 2: adds "group"


def environment(device: torch.device) -> dict[str, Any]:
    versions = {}
    for package in (
        "vat-job",
        "torch",
        "numpy",
        "scikit-learn",
        "pydantic-settings",
        "boto3",
        "structlog",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
    }
    return info


def build_report(
    run_id: str,
    settings: dict[str, Any],
    env: dict[str, Any],
    split: dict[str, Any],
    models: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    return {
        "report_version": REPORT_VERSION,
        "run_id": run_id,
        "group": settings.get("run_group"),
        "created_at": datetime.now(UTC).isoformat(),
        "settings": settings,
        "environment": env,
        "split": split,
        "models": models,
        "timings_s": timings,
    }


def write_summary(layout: RunLayout, report: dict[str, Any], defaults: dict[str, Any]) -> Path:
    """summary.md: the run for a person: headline numbers, the settings that differ from the defaults, the pictures."""
    models, settings = report["models"], report["settings"]
    sizes = next(iter(models.values()))  # every model is evaluated on the same images

    def images(result: dict[str, Any]) -> str:  # "the first 1,000 of" under VAT_EVAL_IMAGES
        return "all of" if result["n"] == 10_000 else f"the first {result['n']:,} of"

    lines = [
        f"# vat-job run {report['run_id']}",
        "",
        f"Made {report['created_at'][:19]} UTC in {report['timings_s']['total'] / 60:.1f} min on "
        f"{report['environment']['device_name']}; group `{report.get('group')}`.",
        "",
        "| model | validation accuracy | macro F1 | MNIST test accuracy | macro F1 | updates |",
        "|---|---|---|---|---|---|",
    ]
    for phase, result in models.items():
        seeded, test = result["seeded_test"], result["mnist_test"]
        lines.append(
            f"| {phase} | {seeded['accuracy']:.4f} | {seeded['macro_f1']:.4f} | {test['accuracy']:.4f} | "
            f"{test['macro_f1']:.4f} | {result['steps']:,} |"
        )
    lines += [
        "",
        f"Validation: {images(sizes['seeded_test'])} the 10,000 images the seeded split holds out of MNIST's",
        f"training set. MNIST test: {images(sizes['mnist_test'])} the official 10,000 test images.",
        "",
        "## Settings that differ from the defaults",
        "",
    ]
    changed = {k: v for k, v in settings.items() if k in defaults and v != defaults[k] and k != "run_id"}
    lines += [f"- `VAT_{k.upper()}={v}`" for k, v in sorted(changed.items())] or ["none"]
    pictures = sorted(layout.plots.glob("*.png")) if layout.plots.is_dir() else []
    if pictures:
        lines += ["", "## Pictures", ""]
        lines += [f"![{p.stem}]({p.relative_to(layout.root).as_posix()})" for p in pictures]
    text = "\n".join(lines) + "\n"
    path = layout.root / "summary.md"
    atomic_write_bytes(path, lambda handle: handle.write(text.encode("utf-8")))
    return path
