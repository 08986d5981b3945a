"""The article's pictures: loss curves, the labelled images, confusion matrices (PNG files in the run folder).

Its own module because matplotlib takes most of a second to import: a run with VAT_PLOTS=false never loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # a batch job has no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from job.layout import RunLayout, atomic_write_bytes  # noqa: E402

DPI = 100  # every picture's resolution


def _save_figure(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(handle: Any) -> None:
        fig.savefig(handle, format="png", dpi=DPI, bbox_inches="tight")

    atomic_write_bytes(path, write)
    plt.close(fig)


def plot_losses(layout: RunLayout, histories: dict[str, dict[str, list[float]]]) -> list[Path]:
    """The article's curves: cross-entropy of both models, and VAT's LDS (plus entropy when used)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, history in histories.items():
        axes[0].plot(history["cross_entropy"], label=name, linewidth=0.8)
    axes[0].set(title="labelled cross-entropy", xlabel="update", yscale="log")
    axes[0].legend()
    vat = histories.get("vat", {})
    axes[1].plot(vat.get("lds", []), label="LDS", linewidth=0.8)
    if any(vat.get("entropy", [])):
        axes[1].plot(vat["entropy"], label="entropy", linewidth=0.8)
    if any(vat.get("consistency", [])):
        axes[1].plot(vat["consistency"], label="consistency", linewidth=0.8)
    axes[1].set(title="VAT: local distributional smoothness", xlabel="update")
    axes[1].legend()
    path = layout.plots / "losses.png"
    _save_figure(fig, path)
    return [path]


def plot_labeled_images(layout: RunLayout, images: torch.Tensor, labels: torch.Tensor) -> Path:
    """The labelled images sorted by class, in a square grid as in the article."""
    order = torch.argsort(labels.cpu(), stable=True)
    images, labels = images.cpu()[order].numpy(), labels.cpu()[order].numpy()
    side = int(np.ceil(np.sqrt(len(images))))
    fig, axes = plt.subplots(side, side, figsize=(side, side))
    for i, ax in enumerate(np.ravel(axes)):
        ax.set_axis_off()
        if i < len(images):
            ax.imshow(images[i], cmap="gray")
            ax.set_title(str(labels[i]), fontsize=6, pad=1)
    fig.subplots_adjust(wspace=0.05, hspace=0.3)
    path = layout.plots / "labeled_images.png"
    _save_figure(fig, path)
    return path


# The cells' counts at DPI=100: 9 pt is 12.5 pixels, legible at 100 % zoom (a 4-digit count fits a cell).
CELL_FONT_PT = 9


def confusion_figure(models: dict[str, Any], test_set: str) -> Any:
    """One confusion matrix per model, side by side, drawn by sklearn's ConfusionMatrixDisplay."""
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 5.2), layout="constrained")
    for ax, (name, result) in zip(np.atleast_1d(axes), models.items(), strict=True):
        scores = result[test_set]
        matrix = np.array(scores["confusion_matrix"])
        display = ConfusionMatrixDisplay(matrix, display_labels=range(len(matrix)))
        display.plot(ax=ax, cmap="Blues", colorbar=False, values_format="d", text_kw={"fontsize": CELL_FONT_PT})
        ax.set(title=f"{name}: accuracy {scores['accuracy']:.4f}", xlabel="predicted", ylabel="true")
    fig.suptitle(test_set)
    return fig


def plot_confusion_matrices(layout: RunLayout, models: dict[str, Any]) -> list[Path]:
    paths = []
    for test_set in ("seeded_test", "mnist_test"):
        path = layout.plots / f"confusion_{test_set}.png"
        _save_figure(confusion_figure(models, test_set), path)
        paths.append(path)
    return paths
