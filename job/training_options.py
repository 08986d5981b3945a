"""Settings of the training options beyond VAT, all off by default and in VAT_PRESET=article: another network,
strong augmentation of the labelled batch, consistency across strong augmentation, targets from the weight average.

A part of `job.settings.Settings` (which inherits these fields and their check), kept here so that settings.py
stays one screenful of concerns; job/settings_help.py documents them with the others.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator


class TrainingOptions(BaseModel):
    model: Literal["article", "conv-small"] = "article"
    labeled_augment: Literal["weak", "strong"] = "weak"
    consistency_weight: float = Field(default=0.0, ge=0, le=1000)
    consistency_targets: Literal["hard", "soft"] = "hard"
    consistency_threshold: float = Field(default=0.95, ge=0, le=1)
    consistency_temperature: float = Field(default=0.4, gt=0, le=10)
    consistency_targets_from: Literal["model", "weight_average"] = "model"
    vat_targets_from: Literal["model", "weight_average"] = "model"
    strong_translate_px: int = Field(default=3, ge=0, le=8)
    strong_rotate_deg: float = Field(default=20.0, ge=0, le=90)
    strong_shear_deg: float = Field(default=15.0, ge=0, le=45)
    strong_scale: float = Field(default=0.15, ge=0, le=0.5)
    strong_elastic_px: float = Field(default=1.5, ge=0, le=8)
    strong_cutout_px: int = Field(default=8, ge=0, le=28)

    @model_validator(mode="after")
    def _weight_average_exists(self) -> TrainingOptions:
        ema_decay = getattr(self, "ema_decay", None)  # a field of Settings, which this class is part of
        for name in ("consistency_targets_from", "vat_targets_from"):
            if getattr(self, name) == "weight_average" and ema_decay == 0:
                raise ValueError(f"VAT_{name.upper()}=weight_average needs a weight average: set VAT_EMA_DECAY > 0")
        return self
