"""The run folder's layout, in one place: the job writes it, storage uploads it, collect reads it back.

<output>/<run_id>/
  report.json, manifest.json (written last), log.jsonl
  baseline/checkpoint-<step>.pt, baseline/model.pt
  vat/checkpoint-<step>.pt, vat/model.pt
  plots/*.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PHASES = ("baseline", "vat")
REPORT = "report.json"
MANIFEST = "manifest.json"
LOG = "log.jsonl"
FINAL_MODEL = "model.pt"
PLOTS = "plots"


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
