"""Which images a finished run gets wrong, next to the labelled images it learnt from.

usage: python bench/confusions.py RUN_FOLDER [--data-dir DIR] [--test-set seeded_test|mnist_test] [--top K]
                                  [--out OUT.png]

RUN_FOLDER is a run folder (runs/<run_id>/, or one fetched with `collect --download`): its report.json gives the
split, its */model.pt the weights. Prints each model's K most frequent confusions on the chosen test set, and draws,
for each of the VAT model's, three rows: the labelled images of the true class, those of the predicted class, and
up to 12 of the misclassified images. When whole styles go wrong (a 1 with a foot read as a 2, a 9 with a hooked
tail read as a 3) while no labelled image shows that style, the errors are a gap in the 100 labels that VAT has
spread over the style's cluster, not noise that a smoother model would fix.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from run_folder import REPO, run_model, run_settings, run_split, test_set

ROW_IMAGES = 12


def top_confusions(matrix: np.ndarray, k: int) -> list[tuple[int, int, int]]:
    """(count, true class, predicted class) of the k largest off-diagonal cells."""
    cells = [(int(matrix[t, p]), t, p) for t in range(10) for p in range(10) if t != p and matrix[t, p]]
    return sorted(cells, reverse=True)[:k]


def image_row(images: np.ndarray) -> np.ndarray:
    """Images side by side with a grey frame, padded to ROW_IMAGES slots so the rows line up."""
    framed = [np.pad(image, 1, constant_values=128) for image in images[:ROW_IMAGES]]
    framed += [np.full((30, 30), 255, dtype=np.uint8)] * (ROW_IMAGES - len(framed))
    return np.concatenate(framed, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_folder", type=Path)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "mnist")
    parser.add_argument("--test-set", choices=("seeded_test", "mnist_test"), default="seeded_test")
    parser.add_argument("--top", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_FOLDER/confusions_<test set>.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from job.evaluate import metrics, predict

    settings = run_settings(args.run_folder)
    data = run_split(settings, args.data_dir)
    images, labels = test_set(data, args.test_set)
    labels = labels.numpy()
    batch_size = settings["eval_batch_size"]
    labeled_images = data.train_images[data.labeled].numpy()
    labeled_labels = data.train_labels[data.labeled].numpy()

    rows, titles = [], []
    for phase in ("baseline", "vat"):
        predictions = predict(run_model(args.run_folder, phase), images, batch_size)
        scores = metrics(labels, predictions)  # the job's own metrics: the same numbers as report.json
        matrix = np.array(scores["confusion_matrix"])
        confusions = top_confusions(matrix, args.top)
        errors = int(matrix.sum() - np.trace(matrix))
        print(f"{phase}: accuracy {scores['accuracy']:.4f}, {errors} errors; most frequent:")
        for count, true, predicted in confusions:
            print(f"  {true} read as {predicted}: {count} ({count / matrix[true].sum():.1%} of the {true}s)")
        if phase != "vat":
            continue
        for count, true, predicted in confusions:
            wrong = images[torch.from_numpy((labels == true) & (predictions == predicted))].numpy()
            rows += [image_row(labeled_images[labeled_labels == c]) for c in (true, predicted)] + [image_row(wrong)]
            titles += [f"labelled {true}s", f"labelled {predicted}s", f"{true}s read as {predicted} ({count})"]

    fig, axes = plt.subplots(len(rows), 1, figsize=(ROW_IMAGES * 0.6, len(rows) * 0.85))
    for ax, row, title in zip(np.atleast_1d(axes), rows, titles, strict=True):
        ax.imshow(row, cmap="gray", vmin=0, vmax=255)
        ax.set_axis_off()
        ax.set_title(title, fontsize=7, loc="left", pad=2)
    out = args.out or args.run_folder / f"confusions_{args.test_set}.png"
    fig.savefig(out, dpi=100, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
