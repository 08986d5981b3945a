"""Settings of the training options beyond VAT, all off in VAT_PRESET=article: another network, strong augmentation
of the labelled batch, consistency across strong augmentation, targets from the weight average. The default has one
on since 0.2.0: consistency across strong augmentation (FixMatch's hard targets, without cutout, ramped in).

A part of `job.settings.Settings` (which inherits these fields and their check), kept here so that settings.py
stays one screenful of concerns; job/settings_help.py documents them with the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

MAX_STEPS = 10_000_000  # 10M updates: days on an H200; a larger number is a typo, not a plan


class TrainingOptions(BaseModel):
    model: Literal["article", "conv-small"] = "article"
    labeled_augment: Literal["weak", "strong"] = "weak"
    consistency_weight: float = Field(default=1.0, ge=0, le=1000)
    consistency_targets: Literal["hard", "soft"] = "hard"
    consistency_threshold: float = Field(default=0.95, ge=0, le=1)
    consistency_temperature: float = Field(default=0.4, gt=0, le=10)
    consistency_targets_from: Literal["model", "weight_average"] = "model"
    consistency_rampup_steps: int = Field(default=1500, ge=0, le=MAX_STEPS)
    vat_targets_from: Literal["model", "weight_average"] = "model"
    strong_translate_px: int = Field(default=3, ge=0, le=8)
    strong_rotate_deg: float = Field(default=20.0, ge=0, le=90)
    strong_shear_deg: float = Field(default=15.0, ge=0, le=45)
    strong_scale: float = Field(default=0.15, ge=0, le=0.5)
    strong_elastic_px: float = Field(default=1.5, ge=0, le=8)
    strong_cutout_px: int = Field(default=0, ge=0, le=28)

    @model_validator(mode="after")
    def _weight_average_exists(self) -> TrainingOptions:
        ema_decay = getattr(self, "ema_decay", None)  # a field of Settings, which this class is part of
        unused = unused_options(dict(self))  # a term that is off needs no average, as it needs no target
        for name in ("consistency_targets_from", "vat_targets_from"):
            if getattr(self, name) == "weight_average" and ema_decay == 0 and name not in unused:
                raise ValueError(f"VAT_{name.upper()}=weight_average needs a weight average: set VAT_EMA_DECAY > 0")
        return self


# Options that change nothing while another option has this value: a run that sets them is the same experiment as
# one that leaves them at their defaults, so checkpoints record and `collect` groups them at their defaults (a resume
# is not refused, a group not split, for a value that is not used). The report keeps the values as they were set.
_CONSISTENCY_DETAILS = (
    "consistency_targets",
    "consistency_threshold",
    "consistency_temperature",
    "consistency_targets_from",
    "consistency_rampup_steps",
)
_STRONG_TRANSFORM = tuple(name for name in TrainingOptions.model_fields if name.startswith("strong_"))


def unused_options(values: Mapping[str, Any]) -> set[str]:
    """The options among `values` (a settings dict, or the part of one a checkpoint records) that are not used."""
    unused = set()
    consistency_off = values.get("consistency_weight", 0) == 0
    if consistency_off:
        unused.update(_CONSISTENCY_DETAILS)
    elif values.get("consistency_targets") == "hard":
        unused.add("consistency_temperature")  # a hard target is the class, not a sharpened distribution
    if values.get("vat_weight", 1) == 0:
        unused.add("vat_targets_from")
    if consistency_off and values.get("labeled_augment", "weak") == "weak":
        unused.update(_STRONG_TRANSFORM)  # nothing is strongly augmented
    return unused & set(values)


def as_used(values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with the unused options at their defaults."""
    unused = unused_options(values)
    return {k: TrainingOptions.model_fields[k].default if k in unused else v for k, v in values.items()}


def takes_weight_average_targets(settings: Any) -> bool:
    """Whether a term that is on takes its target from the weight average (else no update computes that target)."""
    names = ("vat_weight", "consistency_weight", "vat_targets_from", "consistency_targets_from")
    return "weight_average" in as_used({name: getattr(settings, name) for name in names}).values()
