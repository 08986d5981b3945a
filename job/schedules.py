"""What changes from one update to the next: the learning rate (VAT_LR_DECAY) and EntMin's weight (its ramp)."""

from __future__ import annotations


def lr_at(step: int, total: int, lr: float, decay: str) -> float:
    return lr * (1.0 - step / total) if decay == "linear" else lr


def entmin_weight_at(step: int, weight: float, rampup_steps: int) -> float:
    """EntMin's weight: rising linearly over the first `rampup_steps` updates, so that it sharpens predictions
    once VAT has made them mostly right (at full weight from the start it can merge two classes)."""
    return weight * min(1.0, step / rampup_steps) if rampup_steps else weight
