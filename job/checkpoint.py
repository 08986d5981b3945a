"""Checkpoints: atomic writes, safe loads (`weights_only=True`), the latest intact one of a folder, which older
ones to delete (VAT_KEEP_CHECKPOINTS), and which settings a checkpoint must share with the run that resumes from it."""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from job.layout import atomic_write_bytes
from job.presets import IMPLICIT_BEFORE_ADDED
from job.training_options import as_used

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)\.pt$")


class CheckpointError(Exception):
    """A checkpoint is unreadable, truncated, or not a plain tensors-and-containers file."""


class ResumeMismatch(Exception):
    """The run folder holds checkpoints made with other training settings."""


# Settings that change what a phase computes: a run resumed with other values would mix two experiments.
# The network, the labelled batch's augmentation and the strong transform: both phases train with them.
_NETWORK_AND_AUGMENTATION = (
    "translate_px",
    "rotate_deg",
    "elastic_px",
    "hidden_units",
    "model",
    "labeled_augment",
    "strong_translate_px",
    "strong_rotate_deg",
    "strong_shear_deg",
    "strong_scale",
    "strong_elastic_px",
    "strong_cutout_px",
)
TRAINING_FIELDS = {
    "baseline": (
        "seed",
        "test_split_seed",
        "label_split_seed",
        "num_labeled",
        "baseline_steps",
        "labeled_batch_size",
        "lr",
        "lr_decay",
        *_NETWORK_AND_AUGMENTATION,
    ),
    "vat": (
        "seed",
        "test_split_seed",
        "label_split_seed",
        "num_labeled",
        "num_unlabeled",
        "train_steps",
        "labeled_batch_size",
        "unlabeled_batch_size",
        "lr",
        "lr_decay",
        "epsilon",
        "epsilon_scaling",
        "xi",
        "power_iterations",
        "vat_weight",
        "entmin_weight",
        "entmin_rampup_steps",
        "balance_weight",
        "perturbed_bn",
        "dropout_masks",
        "bn_reestimate",
        "ema_decay",
        "consistency_weight",
        "consistency_targets",
        "consistency_threshold",
        "consistency_temperature",
        "consistency_targets_from",
        "consistency_rampup_steps",
        "vat_targets_from",
        *_NETWORK_AND_AUGMENTATION,
    ),
}


def training_settings(phase: str, settings: Any) -> dict[str, Any]:
    """What a checkpoint of `phase` records of the settings, to refuse a resume that would mix experiments (an
    option that is not used at its default: `as_used`)."""
    return as_used({k: getattr(settings, k) for k in TRAINING_FIELDS[phase]})


def check_resumable(phase: str, saved: dict[str, Any], settings: Any) -> None:
    """Raise ResumeMismatch unless the checkpoint's recorded training settings are this run's."""
    unknown = sorted(set(saved) - set(TRAINING_FIELDS[phase]))
    if unknown:
        raise ResumeMismatch(
            f"{phase} checkpoints of this run record settings this version does not know ({', '.join(unknown)}): "
            "they were made by another version of vat-job; use a new VAT_RUN_ID or that version"
        )
    recorded = as_used({**{k: v for k, v in IMPLICIT_BEFORE_ADDED.items() if k in TRAINING_FIELDS[phase]}, **saved})
    current = training_settings(phase, settings)
    mismatched = {k: (v, current[k]) for k, v in recorded.items() if current[k] != v}
    if mismatched:
        # A value nobody set is this version's default: after an upgrade the operator changed nothing, so say so.
        chosen = getattr(settings, "model_fields_set", set(mismatched))
        what = ", ".join(
            f"VAT_{k.upper()} was {old!r}, now {new!r}" + ("" if k in chosen else " (this version's default)")
            for k, (old, new) in mismatched.items()
        )
        raise ResumeMismatch(
            f"{phase} checkpoints of this run were made with other settings ({what}); "
            "use a new VAT_RUN_ID or the old settings"
        )


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialised in memory first (tens of MB), so that a full disk is an OSError (DiskFull), not torch's
    "unexpected pos" from inside its zip writer."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, lambda handle: handle.write(buffer.getbuffer()))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with `weights_only=True`: a file that would run code when unpickled is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(f"{path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path}: not a vat-job checkpoint")
    return state


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint's file name; None for any other file."""
    match = CHECKPOINT_PATTERN.match(name)
    return int(match.group(1)) if match else None


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Checkpoints of `folder`, newest first."""
    if not folder.is_dir():
        return []
    steps = ((checkpoint_step(path.name), path) for path in folder.iterdir())
    return sorted(((step, path) for step, path in steps if step is not None), reverse=True)


def superseded(steps: Iterable[int], written: int, keep: int) -> list[int]:
    """What to delete once checkpoint `written` is saved: all but the newest `keep` at or below it. Higher steps
    are left alone: a resume skipped them as damaged, and training overwrites them when it gets there."""
    return sorted((step for step in steps if step <= written), reverse=True)[keep:]


def prune_checkpoints(folder: Path, written: int, keep: int) -> None:
    checkpoints = dict(list_checkpoints(folder))
    for step in superseded(checkpoints, written, keep):
        checkpoints[step].unlink(missing_ok=True)


def latest_intact_checkpoint(
    folder: Path,
    on_corrupt: Any = lambda path, error: None,
    expected: tuple[str, dict[str, torch.Tensor], Any] | None = None,
) -> dict[str, Any] | None:
    """The newest checkpoint of `folder` that loads (and, given `expected` = (phase, the model's own state_dict,
    the run's settings), is consistent with them); broken ones are reported through `on_corrupt` and skipped.
    Raises ResumeMismatch for an intact checkpoint made with other training settings."""
    for step, path in list_checkpoints(folder):
        try:
            state = load_checkpoint(path)
            if expected is not None:
                check_consistent(state, step, *expected, path)
            return state
        except CheckpointError as error:
            on_corrupt(path, error)
    return None


# The columns of a checkpoint's history, one row per update: the four loss terms, then the share of the consistency
# targets that passed VAT_CONSISTENCY_THRESHOLD (job/consistency.py). A checkpoint from before a column has fewer.
HISTORY_NAMES = ("cross_entropy", "lds", "entropy", "consistency", "confident")


def widened_history(old: torch.Tensor, consistency_on: bool) -> torch.Tensor:
    """A history from before a column, in today's columns. A loss term added since was off in it (a resume across a
    changed option is refused), so it is 0; the confident share was not recorded, so with consistency on it is NaN
    rather than a 0 that would say the threshold kept nothing."""
    wide = torch.zeros(len(old), len(HISTORY_NAMES), dtype=old.dtype)
    wide[:, : old.shape[1]] = old
    if consistency_on and old.shape[1] <= HISTORY_NAMES.index("confident"):
        wide[:, HISTORY_NAMES.index("confident")] = float("nan")
    return wide


RESUME_KEYS = ("phase", "step", "model", "optimizer", "scaler", "rng_cpu", "history", "train_seconds", "settings")


def check_consistent(
    state: dict[str, Any], step: int, phase: str, expected_model: dict[str, torch.Tensor], settings: Any, path: Path
) -> None:
    """A checkpoint a resume may use: every key, the step of its file name, the phase, the training settings, and
    weights of the model's names, shapes and dtypes, all finite. (A changed weight that stays plausible is caught
    only by the sha256 checks of storage.py, not here.)"""
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: lacks {', '.join(missing)}")
    if state["step"] != step or state["phase"] != phase:
        raise CheckpointError(f"{path}: holds {state['phase']!r} step {state['step']!r}, not its file's")
    recorded = state["settings"]
    plain = (bool, int, float, str, type(None))
    if not isinstance(recorded, dict) or not all(isinstance(v, plain) for v in recorded.values()):
        raise CheckpointError(f"{path}: its settings are not readable")
    # Before the shapes: a checkpoint of another VAT_HIDDEN_UNITS is another experiment, not a broken file to skip.
    check_resumable(phase, recorded, settings)
    model = state["model"]
    if not isinstance(model, dict) or set(model) != set(expected_model):
        raise CheckpointError(f"{path}: not this model's weights")
    for name, tensor in model.items():
        want = expected_model[name]
        if not isinstance(tensor, torch.Tensor) or tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise CheckpointError(f"{path}: {name} has another shape or type than the model's")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: {name} holds non-finite values")
    history = state["history"]
    if not isinstance(history, torch.Tensor) or history.ndim != 2 or history.shape[0] != step:
        raise CheckpointError(f"{path}: its loss history does not have {step} rows")
    if history.shape[1] > len(HISTORY_NAMES):  # written by a later version of the job
        raise CheckpointError(
            f"{path}: its history has {history.shape[1]} columns, this job knows {len(HISTORY_NAMES)}"
        )
