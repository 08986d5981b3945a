"""Finished run folders as the raw lines of bench/results/*.jsonl, and their accuracies as mean and std.

    python bench/protocol_lines.py RUN_FOLDER [RUN_FOLDER ...] [--append bench/results/protocol_runs.jsonl]

Each line holds the run id, the settings that tell the protocol's runs apart and the four accuracies (baseline and
VAT, validation and official test) rounded as the tables print them. The summary below the lines gives mean and
standard deviation (n - 1) over the folders, with the error on the official test set in percent.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from job.training_options import TrainingOptions

SETTINGS = ["label_split_seed", "seed", "train_steps", "hidden_units", "ema_decay", "translate_px",
            "unlabeled_batch_size", "eval_images"]  # fmt: skip
# Every option beyond VAT (all of TrainingOptions, so that a new one is recorded without a second list), and the
# terms' weights and masks that the screen's entries change.
OPTIONS = [*TrainingOptions.model_fields, "vat_weight", "entmin_weight", "balance_weight", "dropout_masks"]


def line(run_folder: Path) -> dict[str, Any]:
    report = json.loads((run_folder / "report.json").read_text())
    settings = report["settings"]
    chosen = {name: settings[name] for name in SETTINGS + OPTIONS if name in settings}
    models = {
        phase: {split: round(result[split]["accuracy"], 4) for split in ("seeded_test", "mnist_test")}
        for phase, result in report["models"].items()
    }
    return {"run_id": report["run_id"], "settings": chosen, "models": models}


def summary(lines: list[dict[str, Any]]) -> list[str]:
    rows = []
    for phase in ("baseline", "vat"):
        for split in ("seeded_test", "mnist_test"):
            values = [entry["models"][phase][split] for entry in lines if phase in entry["models"]]
            if not values:
                continue
            spread = statistics.stdev(values) if len(values) > 1 else float("nan")
            rows.append(
                f"{phase:8} {split:11} " + " ".join(f"{v:.4f}" for v in values)
                + f"  mean {statistics.mean(values):.4f} std {spread:.5f}"
                + f"  error {100 * (1 - statistics.mean(values)):.2f} % (std {100 * spread:.2f})"
            )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_folders", nargs="+", type=Path)
    parser.add_argument("--append", type=Path, help="also append the lines to this JSON-lines file")
    args = parser.parse_args()
    lines = [line(folder) for folder in args.run_folders]
    for entry in lines:
        print(json.dumps(entry))
    if args.append:
        with args.append.open("a") as out:
            out.writelines(json.dumps(entry) + "\n" for entry in lines)
    print("\n".join(summary(lines)))


if __name__ == "__main__":
    main()
