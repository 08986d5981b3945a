"""A finished run folder, read back: its label split (from report.json's settings) and its saved models."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from job.data import MnistSplit, load_mnist, raw_dir  # noqa: E402
from job.model import build_model  # noqa: E402


def run_settings(run_folder: Path) -> dict[str, Any]:
    return json.loads((run_folder / "report.json").read_text())["settings"]


def run_split(settings: dict[str, Any], data_dir: Path) -> MnistSplit:
    """The split of the run with these settings (report.json's), drawn again from its seeds: the same labelled
    images and test sets it was scored on."""
    return load_mnist(
        raw_dir(data_dir),
        settings["test_split_seed"],
        settings["label_split_seed"],
        settings["num_labeled"],
        settings["num_unlabeled"],
    )


def test_set(data: MnistSplit, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, labels) of "seeded_test" or "mnist_test"."""
    if name == "seeded_test":
        return data.train_images[data.seeded_test], data.train_labels[data.seeded_test]
    return data.test_images, data.test_labels


def run_model(run_folder: Path, phase: str) -> nn.Module:
    """The shipped model of one phase ("baseline" or "vat"), in eval mode on the CPU."""
    saved = torch.load(run_folder / phase / "model.pt", map_location="cpu", weights_only=True)
    model = build_model(saved["hidden_units"])
    model.load_state_dict(saved["model"])
    return model.eval()
