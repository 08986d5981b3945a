"""`vat-job predict`: classify images with a trained model, one line per image.

    vat-job predict --model RUN_FOLDER_OR_MODEL_PT  digit.png more.png ...
    vat-job predict --model runs/<run_id>  t10k-images-idx3-ubyte       (an MNIST IDX image file: every image)
    vat-job predict --promoted  digit.png                               (the promoted model in the bucket)

Images are read as MNIST's are drawn: a white digit on black, 28 x 28 grey levels (other sizes are scaled to
28 x 28; --invert for a dark digit on a light background). Each line: the file (and the image's index in an IDX
file), the digit, and the model's probability for it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from job.checkpoint import CheckpointError, load_checkpoint
from job.data import read_idx
from job.layout import FINAL_MODEL
from job.model import DigitClassifier, model_from_record
from job.settings import ConfigError
from job.storage import StorageError
from job.untrusted import Untrusted, mask


class PredictError(Exception):
    """A model or an image that cannot be read; the message says which and why."""


def load_model(where: Path, phase: str = "vat") -> torch.nn.Module:
    """The shipped model of a run folder (`<run>/<phase>/model.pt`), or of a model.pt given directly."""
    path = where / phase / FINAL_MODEL if where.is_dir() else where
    try:
        state = load_checkpoint(path)
    except (CheckpointError, FileNotFoundError) as error:
        raise PredictError(f"{path}: not a vat-job model ({error})") from None
    try:
        model = model_from_record(state)
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, ValueError) as error:
        raise PredictError(f"{path}: its weights do not fit the model ({str(error).splitlines()[0]})") from None
    return DigitClassifier(model).eval()


def images_of(path: Path, invert: bool) -> torch.Tensor:
    """uint8 [N, 28, 28]: a PNG's one image, or every image of an IDX image file."""
    try:
        if path.read_bytes()[:4] == b"\x00\x00\x08\x03":  # IDX: unsigned bytes, 3 dimensions
            images = read_idx(path, dims=3)
        else:
            from PIL import Image  # matplotlib's own image library: no dependency of ours alone

            with Image.open(path) as image:
                grey = image.convert("L").resize((28, 28), Image.Resampling.BILINEAR)
                images = torch.from_numpy(np.array(grey, dtype=np.uint8)).unsqueeze(0)
    except (OSError, ValueError) as error:
        raise PredictError(f"{path}: not a PNG or an MNIST IDX image file ({error})") from None
    if images.shape[1:] != (28, 28):
        raise PredictError(f"{path}: images of {tuple(images.shape[1:])} pixels, not 28 x 28")
    return 255 - images if invert else images


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="vat-job predict", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a run folder (its VAT model), or a model.pt")
    source.add_argument("--promoted", action="store_true", help="the promoted model (VAT_S3_BUCKET, VAT_PROMOTE_TO)")
    parser.add_argument("--baseline", action="store_true", help="a run folder's labelled-only baseline instead")
    parser.add_argument("--invert", action="store_true", help="dark digits on a light background")
    parser.add_argument("files", nargs="+", type=Path, help="PNG files, or MNIST IDX image files")
    args = parser.parse_args(list(argv))
    try:
        with tempfile.TemporaryDirectory() as scratch:
            where = fetch_promoted_model(Path(scratch)) if args.promoted else args.model
            model = load_model(where, "baseline" if args.baseline else "vat")
            with torch.inference_mode():
                for file in args.files:
                    images = images_of(file, args.invert)
                    say_predictions(str(file), model(images).softmax(1), indexed=len(images) > 1)
    except (PredictError, ConfigError, StorageError, Untrusted) as error:
        print(mask(f"vat-job predict: {error}"), file=sys.stderr)
        codes = {ConfigError: 2, StorageError: 4, Untrusted: 8}
        return next((code for kind, code in codes.items() if isinstance(error, kind)), 3)
    return 0


def say_predictions(name: str, probabilities: torch.Tensor, indexed: bool) -> None:
    confidence, digits = probabilities.max(1)
    for i, (digit, p) in enumerate(zip(digits.tolist(), confidence.tolist(), strict=True)):
        print(f"{name}[{i}]\t{digit}\t{p:.4f}" if indexed else f"{name}\t{digit}\t{p:.4f}")


def fetch_promoted_model(folder: Path) -> Path:
    """The promoted model.pt, fetched and checked against its pointer (job.promote.fetch_promoted)."""
    from job.promote import PromotionSlot, fetch_promoted
    from job.settings import load_settings
    from job.storage import client_from_settings

    settings = load_settings()
    if not settings.s3_bucket:
        raise PredictError("--promoted needs VAT_S3_BUCKET (and VAT_PROMOTE_TO, default latest)")
    client = client_from_settings(settings)
    fetch_promoted(
        PromotionSlot(client, settings.s3_bucket, settings.s3_prefix, settings.promote_to or "latest"), folder
    )
    return folder / FINAL_MODEL
