"""Test-time shift averaging, measured on finished runs: does averaging the VAT model's softmax over the image and
its 1-pixel shifts (4 or 8 neighbours, zeros filling in as in training's VAT_TRANSLATE_PX) correct any errors?

usage: python bench/test_time_shifts.py RUN_FOLDER... [--data-dir DIR]

Costs no training: it re-predicts both test sets from each run's vat/model.pt (the plain row reproduces
report.json). Prints one JSON line per run folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from run_folder import REPO, run_model, run_settings, run_split, test_set

from job.evaluate import predict_logits

NEIGHBOURS_4 = ((1, 0), (-1, 0), (0, 1), (0, -1))
DIAGONALS = ((1, 1), (-1, 1), (1, -1), (-1, -1))


def shifted(images_uint8: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Every image moved by (dx, dy) whole pixels, zeros filling in."""
    padded = torch.nn.functional.pad(images_uint8, (1, 1, 1, 1))
    height, width = images_uint8.shape[-2:]
    return padded[:, 1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width]


def probabilities(model: torch.nn.Module, images_uint8: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.softmax(predict_logits(model, images_uint8, batch_size).float(), 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_folders", type=Path, nargs="+")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "mnist")
    args = parser.parse_args()
    for folder in args.run_folders:
        settings = run_settings(folder)
        data = run_split(settings, args.data_dir)
        model = run_model(folder, "vat")
        batch_size = settings["eval_batch_size"]
        line = {"run": folder.name, "label_split_seed": settings["label_split_seed"]}
        for name in ("seeded_test", "mnist_test"):
            images, labels = test_set(data, name)
            plain = probabilities(model, images, batch_size)
            four = sum(probabilities(model, shifted(images, dx, dy), batch_size) for dx, dy in NEIGHBOURS_4)
            eight = four + sum(probabilities(model, shifted(images, dx, dy), batch_size) for dx, dy in DIAGONALS)
            for label, p in (("plain", plain), ("shifts5", plain + four), ("shifts9", plain + eight)):
                line[f"{name}_{label}"] = round((p.argmax(1) == labels).float().mean().item(), 4)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
