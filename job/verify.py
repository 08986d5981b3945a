"""What a run read back from the bucket is worth: its manifest checked against the bucket's listing (for
`collect`'s status) and a download checked file by file against the manifest (`collect --download`).

A run is "complete" only when its manifest parses, names this run, and lists files the bucket holds with the
listed sizes; anything else is reported, never raised, so that one damaged run does not hide the others.
"""

from __future__ import annotations

from pathlib import Path

from job.layout import MANIFEST, sha256_of
from job.storage import RunStore
from job.untrusted import Doc, Manifest, Untrusted, parse, path_inside


def fetch_document_or_problem(store: RunStore, relative: str, schema: type[Doc]) -> tuple[Doc | None, str | None]:
    """(document, None), or (None, why it is unusable): one bad document never hides the other runs."""
    try:
        return store.fetch_document(relative, schema), None
    except Untrusted as error:
        return None, str(error)


def manifest_problems(manifest: Manifest, run_id: str, sizes: dict[str, int]) -> list[str]:
    """What is wrong with a manifest, judged from the bucket's listing (names, sizes, run id)."""
    problems = []
    if manifest.run_id != run_id:
        problems.append(f"manifest names run {manifest.run_id!r}")
    for name, entry in sorted(manifest.files.items()):
        if name not in sizes:
            problems.append(f"{name} is in the manifest but not in the bucket")
        elif sizes[name] != entry.size:
            problems.append(f"{name} is {sizes[name]} bytes, the manifest says {entry.size}")
    return problems


def download_run(store: RunStore, folder: Path) -> tuple[list[str], list[str], list[str]]:
    """Fetch a run into `folder`; return (files fetched, problems, notes). Problems: unsafe keys, objects that do
    not match the sha256 recorded at upload, any difference from the manifest (files missing, sha256, run id).
    Notes: what was skipped harmlessly (folder markers)."""
    problems: list[str] = []
    notes: list[str] = []

    def on_problem(event: str, key: str, reason: str) -> None:
        (notes if event == "folder_marker_skipped" else problems).append(f"{key}: {reason}")

    fetched = store.download(folder, on_problem=on_problem, require_sha256=False)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return fetched, [*problems, "no manifest.json: the run is incomplete and its files are not verified"], notes
    try:
        manifest = parse(manifest_path.read_bytes(), Manifest, MANIFEST)
    except Untrusted as error:
        return fetched, [*problems, str(error)], notes
    if manifest.run_id != store.run_id:
        problems.append(f"manifest names run {manifest.run_id!r}, not {store.run_id!r}")
    for name, entry in sorted(manifest.files.items()):
        path = path_inside(folder, name)
        if path is None or not path.is_file():
            problems.append(f"{name}: in the manifest but not downloaded")
        elif sha256_of(path) != entry.sha256:
            problems.append(f"{name}: sha256 differs from the manifest's")
    return fetched, problems, notes
