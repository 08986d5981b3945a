"""What a run read back from the bucket is worth: its manifest checked against the bucket's listing (for
`collect`'s status) and a download checked file by file against the manifest (`collect --download`).

A run is "complete" only when its manifest parses, names this run, and lists files the bucket holds with the
listed sizes; anything else is reported, never raised, so that one damaged run does not hide the others.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from job.layout import MANIFEST, sha256_of
from job.storage import RunStore, safe_relative


def fetch_json_or_problem(store: RunStore, relative: str) -> tuple[Any, str | None]:
    try:
        value = store.fetch_json(relative)
    except (ValueError, UnicodeDecodeError):
        return None, f"{relative} is not valid JSON (truncated?)"
    return (value, None) if isinstance(value, dict) else (None, f"{relative} is not a JSON object")


def manifest_problems(manifest: dict[str, Any], run_id: str, sizes: dict[str, int]) -> list[str]:
    """What is wrong with a manifest, judged from the bucket's listing (names, sizes, run id)."""
    problems = []
    if manifest.get("run_id") != run_id:
        problems.append(f"manifest names run {manifest.get('run_id')!r}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        return [*problems, "manifest has no file list"]
    for name, entry in sorted(files.items()):
        if safe_relative(name) is None or not isinstance(entry, dict):
            problems.append(f"manifest entry {name!r} is not a plain file")
        elif name not in sizes:
            problems.append(f"{name} is in the manifest but not in the bucket")
        elif sizes[name] != entry.get("size"):
            problems.append(f"{name} is {sizes[name]} bytes, the manifest says {entry.get('size')}")
    return problems


def download_run(store: RunStore, folder: Path) -> tuple[list[str], list[str]]:
    """Fetch a run into `folder`; return (files fetched, problems): unsafe keys, objects that do not match the
    sha256 recorded at upload, and any difference from the manifest (files missing, sha256, run id)."""
    problems: list[str] = []
    fetched = store.download(
        folder,
        on_problem=lambda event, key, reason: problems.append(f"{key}: {reason}"),
        require_sha256=False,
    )
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return fetched, [*problems, "no manifest.json: the run is incomplete and its files are not verified"]
    try:
        manifest = json.loads(manifest_path.read_text())
        files = {name: entry for name, entry in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return fetched, [*problems, "manifest.json is not a valid manifest"]
    if manifest.get("run_id") != store.run_id:
        problems.append(f"manifest names run {manifest.get('run_id')!r}, not {store.run_id!r}")
    for name, entry in sorted(files.items()):
        path = folder / name if safe_relative(name) else None
        if path is None or not path.is_file():
            problems.append(f"{name}: in the manifest but not downloaded")
        elif not isinstance(entry, dict) or sha256_of(path) != entry.get("sha256"):
            problems.append(f"{name}: sha256 differs from the manifest's")
    return fetched, problems
