"""The quality gate of promotion (job/promote.py): what it judges and when a candidate passes.

It judges validation accuracy, `METRIC`: the VAT model's accuracy on the seeded split's held-out images of MNIST's
training set (report.json's models.vat.seeded_test). The official test set's (`TEST_METRIC`, models.vat.mnist_test)
is recorded beside it in every verdict, pointer and history entry, and never gated on: a test set that decides
which model ships stops being a test set. A candidate passes when it is
- at least VAT_PROMOTE_MIN_ACCURACY,
- not more than VAT_PROMOTE_MAX_REGRESSION below the promoted model, and
- not more than VAT_PROMOTE_MAX_DRIFT below the best of the last VAT_PROMOTE_DRIFT_WINDOW promoted models, so that
  steps each within the regression margin cannot add up to a slide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

METRIC = "vat.seeded_test.accuracy"  # validation: what the gate judges
TEST_METRIC = "vat.mnist_test.accuracy"  # the official test set: recorded beside it, never gated on


@dataclass(frozen=True)
class Gate:
    min_accuracy: float
    max_regression: float
    max_drift: float = 1.0
    drift_window: int = 1

    def floor(self, recent: Sequence[float]) -> float | None:
        """The drift floor: the best of the last `drift_window` promoted models (newest first) less max_drift."""
        window = recent[: self.drift_window]
        return max(0.0, round(max(window) - self.max_drift, 12)) if window else None

    def judge(self, candidate: float, promoted: float | None, recent: Sequence[float] = ()) -> tuple[bool, str]:
        """(passed, why) for a candidate accuracy against the promoted model's (None: nothing promoted yet) and the
        accuracies of the last promoted models, newest first."""
        if candidate < self.min_accuracy:
            return False, f"accuracy {candidate:.4f} is below the minimum {self.min_accuracy:.4f}"
        if promoted is not None and candidate < round(promoted - self.max_regression, 12):
            return False, (
                f"accuracy {candidate:.4f} is more than {self.max_regression:.4f} below the promoted model's "
                f"{promoted:.4f}"
            )
        floor = self.floor(recent)
        if floor is not None and candidate < floor:
            window = recent[: self.drift_window]
            return False, (
                f"accuracy {candidate:.4f} is more than {self.max_drift:.4f} below {max(window):.4f}, the best of "
                f"the last {len(window)} promoted models (drift floor {floor:.4f})"
            )
        if promoted is None:
            return True, f"accuracy {candidate:.4f} >= {self.min_accuracy:.4f}; nothing promoted yet"
        return True, (
            f"accuracy {candidate:.4f} is within {self.max_regression} of the promoted {promoted:.4f}"
            + (f" and at least the drift floor {floor:.4f}" if floor is not None else "")
        )


def accuracies(report: dict[str, Any]) -> tuple[float, float | None]:
    """(validation accuracy, official test accuracy) of a run's VAT model, from its report."""
    vat = report["models"]["vat"]
    test = vat.get("mnist_test", {}).get("accuracy")
    return float(vat["seeded_test"]["accuracy"]), None if test is None else float(test)
