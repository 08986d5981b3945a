"""report.json and the article's pictures (loss curves, the labelled images, confusion matrices)."""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # a batch job has no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from job.layout import (
    RunLayout,  # noqa: E402
    atomic_write_bytes,  # noqa: E402
)

REPORT_VERSION = 2  # 2: adds "group"
DPI = 100  # every picture's resolution


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


def _save_figure(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(handle: Any) -> None:
        fig.savefig(handle, format="png", dpi=DPI, bbox_inches="tight")

    atomic_write_bytes(path, write)
    plt.close(fig)


def plot_losses(layout: RunLayout, histories: dict[str, dict[str, list[float]]]) -> list[Path]:
    """The article's curves: cross-entropy of both models, and VAT's LDS (plus entropy when used)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, history in histories.items():
        axes[0].plot(history["cross_entropy"], label=name, linewidth=0.8)
    axes[0].set(title="labelled cross-entropy", xlabel="update", yscale="log")
    axes[0].legend()
    vat = histories.get("vat", {})
    axes[1].plot(vat.get("lds", []), label="LDS", linewidth=0.8)
    if any(vat.get("entropy", [])):
        axes[1].plot(vat["entropy"], label="entropy", linewidth=0.8)
    if any(vat.get("consistency", [])):
        axes[1].plot(vat["consistency"], label="consistency", linewidth=0.8)
    axes[1].set(title="VAT: local distributional smoothness", xlabel="update")
    axes[1].legend()
    path = layout.plots / "losses.png"
    _save_figure(fig, path)
    return [path]


def plot_labeled_images(layout: RunLayout, images: torch.Tensor, labels: torch.Tensor) -> Path:
    """The labelled images sorted by class, in a square grid as in the article."""
    order = torch.argsort(labels.cpu(), stable=True)
    images, labels = images.cpu()[order].numpy(), labels.cpu()[order].numpy()
    side = int(np.ceil(np.sqrt(len(images))))
    fig, axes = plt.subplots(side, side, figsize=(side, side))
    for i, ax in enumerate(np.ravel(axes)):
        ax.set_axis_off()
        if i < len(images):
            ax.imshow(images[i], cmap="gray")
            ax.set_title(str(labels[i]), fontsize=6, pad=1)
    fig.subplots_adjust(wspace=0.05, hspace=0.3)
    path = layout.plots / "labeled_images.png"
    _save_figure(fig, path)
    return path


# The cells' counts at DPI=100: 9 pt is 12.5 pixels, legible at 100 % zoom (a 4-digit count fits a cell).
CELL_FONT_PT = 9


def confusion_figure(models: dict[str, Any], test_set: str) -> Any:
    """One confusion matrix per model, side by side, drawn by sklearn's ConfusionMatrixDisplay."""
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 5.2), layout="constrained")
    for ax, (name, result) in zip(np.atleast_1d(axes), models.items(), strict=True):
        scores = result[test_set]
        matrix = np.array(scores["confusion_matrix"])
        display = ConfusionMatrixDisplay(matrix, display_labels=range(len(matrix)))
        display.plot(ax=ax, cmap="Blues", colorbar=False, values_format="d", text_kw={"fontsize": CELL_FONT_PT})
        ax.set(title=f"{name}: accuracy {scores['accuracy']:.4f}", xlabel="predicted", ylabel="true")
    fig.suptitle(test_set)
    return fig


def plot_confusion_matrices(layout: RunLayout, models: dict[str, Any]) -> list[Path]:
    paths = []
    for test_set in ("seeded_test", "mnist_test"):
        path = layout.plots / f"confusion_{test_set}.png"
        _save_figure(confusion_figure(models, test_set), path)
        paths.append(path)
    return paths


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
