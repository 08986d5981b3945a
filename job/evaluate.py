"""Predictions and metrics: accuracy, macro F1, per-class report and confusion matrix (scikit-learn)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score
from torch import nn

from job.data import MnistSplit, as_float_batch

CLASSES = [str(digit) for digit in range(10)]


@torch.inference_mode()
def predict_logits(model: nn.Module, images_uint8: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The model's logits for uint8 images, in eval mode, `batch_size` images at a time."""
    model.eval()
    chunks = [
        model(as_float_batch(images_uint8[i : i + batch_size], channels_last=True))
        for i in range(0, len(images_uint8), batch_size)
    ]
    return torch.cat(chunks)


def predict(model: nn.Module, images_uint8: torch.Tensor, batch_size: int) -> np.ndarray:
    return predict_logits(model, images_uint8, batch_size).argmax(1).cpu().numpy()


def metrics(labels: np.ndarray, predictions: np.ndarray) -> dict[str, Any]:
    return {
        "n": int(len(labels)),
        "accuracy": float(accuracy_score(labels, predictions)),
        "error_rate": float(1.0 - accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro")),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=list(range(10))).tolist(),
        "classification_report": classification_report(
            labels, predictions, labels=list(range(10)), target_names=CLASSES, output_dict=True, zero_division=0
        ),
    }


def evaluate(model: nn.Module, data: MnistSplit, batch_size: int, max_images: int = 0) -> dict[str, dict[str, Any]]:
    """Metrics on the seeded test set (10,000 held-out training images) and the official MNIST test set; with
    `max_images`, on the first that many images of each (VAT_EVAL_IMAGES: quick checks, noisier figures)."""
    first = slice(max_images or None)
    seeded = data.seeded_test[first]
    return {
        "seeded_test": metrics(
            data.train_labels[seeded].cpu().numpy(), predict(model, data.train_images[seeded], batch_size)
        ),
        "mnist_test": metrics(
            data.test_labels[first].cpu().numpy(), predict(model, data.test_images[first], batch_size)
        ),
    }
