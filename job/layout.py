"""The run folder's layout, in one place: the job writes it, storage uploads it, collect reads it back.

<output>/<run_id>/
  report.json, manifest.json (written last), log.jsonl
  baseline/checkpoint-<step>.pt, baseline/model.pt
  vat/checkpoint-<step>.pt, vat/model.pt
  plots/*.png
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

PHASES = ("baseline", "vat")
REPORT = "report.json"
MANIFEST = "manifest.json"
LOG = "log.jsonl"
FINAL_MODEL = "model.pt"
EXPORTED_MODEL = "model.pt2"  # the same weights as a torch.export program: loads without vat-job
PLOTS = "plots"


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
UMASK = os.umask(0o022)  # read once, at import (reading it means setting it), and set back at once
os.umask(UMASK)


class DiskFull(Exception):
    """The run folder's file system is full (or a quota / file-size limit is reached)."""


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def of(cls, output_dir: Path, run_id: str) -> RunLayout:
        return cls(Path(output_dir) / run_id)

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def log(self) -> Path:
        return self.root / LOG

    @property
    def plots(self) -> Path:
        return self.root / PLOTS

    def phase(self, name: str) -> Path:
        return self.root / name

    def final_model(self, phase: str) -> Path:
        return self.root / phase / FINAL_MODEL


def atomic_write_bytes(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync it, then rename it over `path`.

    A full disk raises DiskFull (the file under its final name is untouched)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600; the file gets what open() would give it (0644 under 022)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except OSError as error:
        Path(tmp_name).unlink(missing_ok=True)
        if error.errno in NO_SPACE:
            raise DiskFull(f"no space left to write {path} ({error.strerror})") from None
        raise
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def unwritable(folder: Path) -> str | None:
    """Why this process cannot create files in `folder` (made if missing), or None when it can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        return str(error.strerror or error)
    return None


def write_json(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2) + "\n"
    atomic_write_bytes(path, lambda handle: handle.write(text.encode("utf-8")))


def sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
