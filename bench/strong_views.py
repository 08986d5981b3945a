"""How a finished run's model reads strongly augmented test images: each part of the strong transform alone, all
of it, and all but cutout, at the VAT_STRONG_* strengths given (the defaults unless named; cutout 8 pixels, its
value in issue 26's screen, where the default has none since 0.2.0).

usage: python bench/strong_views.py RUN_FOLDER [--data-dir DIR] [--test-set seeded_test|mnist_test]
                                    [--phase vat|baseline] [--pair 7 2] [--seed 0] [--STRONG_OPTION VALUE ...]

For one pair of classes (A, B) it prints, per view: the accuracy, how many As are read as B (and how many of
those with a confidence of at least 0.95, what FixMatch's threshold would keep as a pseudo-label), and how many Bs
are read as A. A model that never trained on strong views shows how far from its data they lie; one that did
shows whether a part of the transform moves one class onto the other.
"""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path

import torch
from run_folder import REPO, run_model, run_settings, run_split, test_set

from job.augment import StrongAugmentation, strongly_augmented
from job.data import as_float_batch
from job.training_options import TrainingOptions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_folder", type=Path)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "mnist")
    parser.add_argument("--test-set", choices=("seeded_test", "mnist_test"), default="seeded_test")
    parser.add_argument("--phase", choices=("vat", "baseline"), default="vat")
    parser.add_argument("--pair", type=int, nargs=2, default=(7, 2), metavar=("A", "B"))
    parser.add_argument("--seed", type=int, default=0)
    parts = [field.name for field in fields(StrongAugmentation)]
    for name in parts:
        parser.add_argument(f"--{name}", type=float, default=None, help=f"VAT_STRONG_{name.upper()}")
    args = parser.parse_args()

    defaults = TrainingOptions(strong_cutout_px=8)
    strength = StrongAugmentation.from_settings(defaults)
    strength = replace(
        strength, **{n: type(getattr(strength, n))(v) for n in parts if (v := getattr(args, n)) is not None}
    )
    nothing = replace(strength, **{n: type(getattr(strength, n))(0) for n in parts})
    views = {"none": None, "all": strength, "all but cutout": replace(strength, cutout_px=0)}
    views.update({f"{n} alone": replace(nothing, **{n: getattr(strength, n)}) for n in parts})

    data = run_split(run_settings(args.run_folder), args.data_dir)
    images, labels = test_set(data, args.test_set)
    model = run_model(args.run_folder, args.phase)
    a, b = args.pair
    print(f"{args.run_folder.name} ({args.phase}), {args.test_set}, strengths {strength}")
    for name, view in views.items():
        torch.manual_seed(args.seed)  # every view draws from the same stream: the rows differ by the transform
        batch = as_float_batch(images) if view is None else strongly_augmented(images, view)
        with torch.no_grad():
            probabilities = torch.cat([model(chunk).softmax(dim=1) for chunk in batch.split(1000)])
        confidence, predicted = probabilities.max(dim=1)
        a_as_b = (labels == a) & (predicted == b)
        print(
            f"{name:18s} accuracy {(predicted == labels).float().mean().item():.4f}  "
            f"{a} read as {b}: {int(a_as_b.sum()):4d} ({int((a_as_b & (confidence >= 0.95)).sum()):4d} at >= 0.95)  "
            f"{b} read as {a}: {int(((labels == b) & (predicted == a)).sum()):4d}"
        )


if __name__ == "__main__":
    main()
