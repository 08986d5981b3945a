"""What changes from one update to the next: the learning rate (VAT_LR_DECAY) and the ramped weights of EntMin and
of the consistency term."""

from __future__ import annotations

from typing import Any


def lr_at(step: int, total: int, lr: float, decay: str) -> float:
    return lr * (1.0 - step / total) if decay == "linear" else lr


def ramped_weight(step: int, weight: float, rampup_steps: int) -> float:
    """A term's weight rising linearly over the first `rampup_steps` updates, so that it acts on predictions VAT
    has already made mostly right: EntMin at full weight from the start can merge two classes, and the consistency
    term can spread an early confident mistake over a whole style (BENCHMARKS.md, issue 26)."""
    return weight * min(1.0, step / rampup_steps) if rampup_steps else weight


def ramped_weights(step: int, settings: Any) -> dict[str, float]:
    """This update's weights of the ramped terms, by name (VAT_ENTMIN_*, VAT_CONSISTENCY_*)."""
    return {
        "entmin": ramped_weight(step, settings.entmin_weight, settings.entmin_rampup_steps),
        "consistency": ramped_weight(step, settings.consistency_weight, settings.consistency_rampup_steps),
    }
