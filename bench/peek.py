"""How a run under way reads the validation images now: its newest VAT checkpoint, scored on the seeded split's
held-out images only (never the official test set: a peek is a look at a run in progress, and only validation data
may steer one, e.g. stopping a screen run whose draw has already collapsed). A peek at a run on a fresh draw
makes that draw a tuning draw: peek at tuning draws only.

usage: python bench/peek.py RUN_FOLDER [--data-dir DIR] [--top K]

Prints, for the weight average (what the run would ship, when VAT_EMA_DECAY is on) and for the last weights: the
update, the validation accuracy, the K most frequent confusions, and how many validation images each class is
predicted for beside how many it has (a class that swallows another's style is predicted for too many).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from confusions import top_confusions
from run_folder import run_split, test_set
from sklearn.metrics import confusion_matrix

from job.checkpoint import latest_intact_checkpoint
from job.evaluate import predict
from job.model import build_model, weight_average


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_folder", type=Path)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/mnist"))
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()

    state = latest_intact_checkpoint(args.run_folder / "vat")  # the one a resume would take, a broken one skipped
    if state is None:
        raise SystemExit(f"{args.run_folder}/vat has no checkpoint yet: the VAT phase has not saved one")
    settings = state["settings"]
    images, labels = test_set(run_split(settings, args.data_dir), "seeded_test")
    truth = labels.numpy()

    def network() -> torch.nn.Module:
        return build_model(settings["hidden_units"], settings.get("model", "article"))

    last = network()
    last.load_state_dict(state["model"])
    models = {"last weights": last}
    if state.get("ema"):
        average = weight_average(network(), 0.0)
        average.load_state_dict(state["ema"])  # the decay only steers updates; the weights are the checkpoint's
        models = {"weight average": average.module, **models}
    step, steps, draw = state["step"], settings["train_steps"], settings["label_split_seed"]
    print(f"{args.run_folder}: update {step} of {steps}, label seed {draw}")
    for name, model in models.items():
        predicted = predict(model.eval(), images, batch_size=1000)
        matrix = confusion_matrix(truth, predicted, labels=list(range(10)))
        confusions = ", ".join(f"{t} read as {p}: {n}" for n, t, p in top_confusions(matrix, args.top))
        print(f"  {name}: validation accuracy {np.mean(predicted == truth):.4f}; {confusions}")
        counts = " ".join(f"{c}:{int(matrix[:, c].sum())}/{int(matrix[c].sum())}" for c in range(10))
        print(f"    predicted/true per class: {counts}")


if __name__ == "__main__":
    main()
