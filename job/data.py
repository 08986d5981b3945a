"""MNIST: find it or download it (checksummed), load it as uint8 tensors, and make the seed article's split."""

from __future__ import annotations

import base64
import gzip
import math
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.nn import functional as F

from job.layout import UMASK, sha256_of
from job.untrusted import without_userinfo

# SHA256 of the four uncompressed files, as torchvision's mirrors serve them (gzipped).
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
NUM_TRAIN = 60_000
SEEDED_TEST_SIZE = 10_000
# IDX magic numbers: 0x08 = unsigned bytes, then the number of dimensions.
IDX_UBYTE_MAGIC = {1: 0x00000801, 3: 0x00000803}


class DataError(Exception):
    """MNIST could not be found, verified or downloaded."""


def raw_dir(data_dir: Path) -> Path:
    """torchvision's layout: <data_dir>/MNIST/raw/*-ubyte."""
    return Path(data_dir) / "MNIST" / "raw"


def ensure_mnist(
    data_dir: Path,
    mirrors: Sequence[str],
    *,
    expected: Mapping[str, str] = MNIST_SHA256,
    retries: int = 3,
    timeout_s: float = 60.0,
    backoff_s: float = 1.0,
    on_event: Callable[..., None] = lambda event, **kw: None,
) -> Path:
    """Make sure every file of `expected` is in `data_dir` and matches its checksum; return the raw folder.

    A file that is missing, truncated or corrupted is (re-)downloaded from the first mirror that serves
    a copy with the right checksum; it only ever lands under its final name once verified.
    """
    folder = raw_dir(data_dir)
    for name, sha in expected.items():
        path = folder / name
        if path.is_file():
            if sha256_of(path) == sha:
                continue
            on_event("mnist_file_corrupt", file=str(path), action="downloading again")
        _download_verified(name, sha, folder, mirrors, retries, timeout_s, backoff_s, on_event)
    return folder


def _download_verified(
    name: str,
    sha: str,
    folder: Path,
    mirrors: Sequence[str],
    retries: int,
    timeout_s: float,
    backoff_s: float,
    on_event: Callable[..., None],
) -> None:
    if not mirrors:
        raise DataError(f"{folder / name} is missing or corrupt and no mirror is configured (set VAT_MNIST_MIRRORS)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise DataError(
            f"{folder / name} is missing or corrupt and {folder} cannot be written to download it "
            f"({error.strerror or error}): put the four MNIST *-ubyte files there (in a container: mount a folder "
            f"that holds MNIST/raw/ at VAT_DATA_DIR), or make the folder writable"
        ) from None
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name + ".gz"
        for attempt in range(1, retries + 1):
            try:
                _fetch_gz(url, folder / name, sha, timeout_s)
                on_event("mnist_file_downloaded", file=name, url=url, attempt=attempt)
                return
            # zlib.error: a corrupt gzip stream; anything a mirror sends is its failure, and the next one is tried
            except (OSError, urllib.error.URLError, EOFError, ValueError, zlib.error) as error:
                failures.append(f"{url}: {error}")
                on_event("mnist_download_failed", url=url, attempt=attempt, error=str(error))
                if attempt < retries:
                    time.sleep(backoff_s * 2 ** (attempt - 1))
    raise DataError(
        f"could not download {name} from any mirror ({len(failures)} attempts; last: {failures[-1]}); "
        f"put the MNIST files in {folder} or set VAT_MNIST_MIRRORS"
    )


def _fetch_gz(url: str, target: Path, sha: str, timeout_s: float) -> None:
    """Download, decompress and verify into a temporary file beside `target`, then rename it into place."""
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        with (
            urllib.request.urlopen(_request(url), timeout=timeout_s) as response,
            tempfile.TemporaryFile() as compressed,
        ):
            shutil.copyfileobj(response, compressed)
            compressed.seek(0)
            with gzip.GzipFile(fileobj=compressed) as unzipped, tmp_path.open("wb") as out:
                shutil.copyfileobj(unzipped, out)
        actual = sha256_of(tmp_path)
        if actual != sha:
            raise ValueError(f"checksum mismatch (sha256 {actual[:12]}..., expected {sha[:12]}...)")
        os.chmod(tmp_path, 0o666 & ~UMASK)  # as a plain open() would make it, not NamedTemporaryFile's 0600
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def _request(url: str) -> urllib.request.Request:
    """A GET of `url`; a mirror's user:password@ goes as HTTP basic authentication, since urllib would read the
    userinfo as part of the host (and quote the password in its error)."""
    bare, user, password = without_userinfo(url)
    request = urllib.request.Request(bare)
    if user is not None:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


@dataclass
class MnistSplit:
    """The 60,000 training and 10,000 test images as uint8 tensors, with the seeded split as index tensors."""

    train_images: torch.Tensor  # [60000, 28, 28] uint8
    train_labels: torch.Tensor  # [60000] int64
    test_images: torch.Tensor  # [10000, 28, 28] uint8, the official MNIST test set
    test_labels: torch.Tensor
    labeled: torch.Tensor  # indices into the training images
    unlabeled: torch.Tensor
    seeded_test: torch.Tensor

    def to(self, device: torch.device) -> MnistSplit:
        return MnistSplit(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})

    def labeled_class_counts(self) -> list[int]:
        return torch.bincount(self.train_labels[self.labeled].cpu(), minlength=10).tolist()


def seeded_split(
    num_train: int, test_split_seed: int, label_split_seed: int, num_labeled: int, num_unlabeled: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The article's split as indices: (labelled, unlabelled, seeded test).

    The article calls `train_test_split` on the dataset object itself; scikit-learn draws the same
    permutation from the length alone, so splitting `arange(num_train)` gives the very same images.
    A smaller unlabelled set is the first `num_unlabeled` of the (already shuffled) unlabelled pool, so
    smaller sets are nested in larger ones.
    """
    pool, seeded_test = train_test_split(np.arange(num_train), random_state=test_split_seed, test_size=SEEDED_TEST_SIZE)
    labeled, unlabeled = train_test_split(pool, random_state=label_split_seed, test_size=len(pool) - num_labeled)
    if num_unlabeled is not None:
        unlabeled = unlabeled[:num_unlabeled]
    return np.asarray(labeled), np.asarray(unlabeled), np.asarray(seeded_test)


def load_mnist(
    folder: Path, test_split_seed: int, label_split_seed: int, num_labeled: int, num_unlabeled: int | None = None
) -> MnistSplit:
    """Read the four IDX files of `folder` and apply the seeded split."""
    try:
        train_images = read_idx(folder / "train-images-idx3-ubyte", dims=3)
        train_labels = read_idx(folder / "train-labels-idx1-ubyte", dims=1)
        test_images = read_idx(folder / "t10k-images-idx3-ubyte", dims=3)
        test_labels = read_idx(folder / "t10k-labels-idx1-ubyte", dims=1)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read MNIST from {folder}: {error}") from None
    if len(train_images) != NUM_TRAIN or len(train_labels) != NUM_TRAIN:
        raise DataError(f"{folder} holds {len(train_images)} training images, expected {NUM_TRAIN}")
    labeled, unlabeled, seeded_test = seeded_split(
        len(train_images), test_split_seed, label_split_seed, num_labeled, num_unlabeled
    )
    return MnistSplit(
        train_images=train_images,
        train_labels=train_labels.long(),
        test_images=test_images,
        test_labels=test_labels.long(),
        labeled=torch.from_numpy(labeled).long(),
        unlabeled=torch.from_numpy(unlabeled).long(),
        seeded_test=torch.from_numpy(seeded_test).long(),
    )


def read_idx(path: Path, dims: int) -> torch.Tensor:
    """An IDX file of unsigned bytes (MNIST's format) as a uint8 tensor of `dims` dimensions.

    Read here rather than with torchvision's reader: importing torchvision loads torch._dynamo and its
    model zoo, 2.5 s and 160 MB of resident memory that the job never uses (BENCHMARKS.md).
    """
    with path.open("rb") as file:
        header = file.read(4 + 4 * dims)
        if len(header) < 4 + 4 * dims or int.from_bytes(header[:4], "big") != IDX_UBYTE_MAGIC[dims]:
            raise ValueError(f"{path.name} is not an IDX file of {dims}-dimensional unsigned bytes")
        shape = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
        body = bytearray(int(np.prod(shape)))
        if file.readinto(body) != len(body) or file.read(1):
            raise ValueError(f"{path.name}: the size does not match its header's shape {shape}")
    return torch.frombuffer(body, dtype=torch.uint8).reshape(shape)


def as_float_batch(images_uint8: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28] in [0, 1], as torchvision's ToTensor gives."""
    batch = images_uint8.unsqueeze(1).float().div_(255.0)
    return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch


def training_batch(
    images_uint8: torch.Tensor,
    indices: torch.Tensor,
    batch_size: int,
    shift_px: int = 0,
    rotate_deg: float = 0.0,
    elastic_px: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniform batch of `indices` without replacement (all of them, in order, when the batch is that large), as
    channels-last floats, each image randomly shifted by up to `shift_px` pixels, then turned by up to `rotate_deg`
    degrees and elastically distorted by `elastic_px` pixels (`randomly_deformed`); returns (images, indices)."""
    if batch_size < len(indices):
        indices = indices[torch.rand(len(indices), device=indices.device).topk(batch_size, sorted=False).indices]
    batch = as_float_batch(randomly_shifted(images_uint8[indices], shift_px), channels_last=True)
    return randomly_deformed(batch, rotate_deg, elastic_px), indices


def randomly_shifted(images_uint8: torch.Tensor, max_px: int) -> torch.Tensor:
    """Each image moved by its own random whole-pixel shift in [-max_px, max_px] along each axis (zeros fill in).

    Beyond the article (VAT_TRANSLATE_PX). Drawn on the images' device from its default generator, without a
    host round trip, so it works inside a CUDA graph and a resumed run draws the same shifts.
    """
    if max_px == 0:
        return images_uint8
    n, height, width = images_uint8.shape
    padded = F.pad(images_uint8, (max_px, max_px, max_px, max_px))
    offsets = torch.randint(0, 2 * max_px + 1, (2, n, 1), device=images_uint8.device)
    rows = offsets[0] + torch.arange(height, device=images_uint8.device)
    cols = offsets[1] + torch.arange(width, device=images_uint8.device)
    batch = torch.arange(n, device=images_uint8.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


ELASTIC_SMOOTHING_PX = 4.0  # Simard et al. (2003): the displacement field is white noise blurred with this sigma


def randomly_deformed(batch: torch.Tensor, max_deg: float, elastic_px: float) -> torch.Tensor:
    """Each image of a float batch [N, 1, S, S] turned about its centre by its own random angle in [-max_deg, max_deg]
    degrees (VAT_ROTATE_DEG), and displaced along a smooth random field whose two components have a standard
    deviation of `elastic_px` pixels at every pixel (Simard et al.'s elastic distortion, VAT_ELASTIC_PX: strokes
    bend, loops open or close, as another hand would write them). Beyond the article; drawn on the device like the
    shifts; with both at 0 the batch is returned as it is and nothing is drawn."""
    if max_deg == 0 and elastic_px == 0:
        return batch
    n, size = len(batch), batch.shape[-1]
    angles = torch.zeros(n, device=batch.device)
    if max_deg:
        angles = (torch.rand(n, device=batch.device) * 2 - 1) * math.radians(max_deg)
    displacement = None
    if elastic_px:
        displacement = smooth_noise(n, size, ELASTIC_SMOOTHING_PX, batch.device) * (elastic_px * 2 / size)
    return warped(batch, angles, displacement)


def smooth_noise(n: int, size: int, sigma_px: float, device: torch.device) -> torch.Tensor:
    """[n, size, size, 2] Gaussian white noise blurred by a Gaussian of `sigma_px`, rescaled to unit variance."""
    radius = math.ceil(3 * sigma_px)
    taps = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma_px) ** 2)
    kernel = kernel / kernel.norm()  # unit L2 norm along each axis: blurred unit-variance noise keeps variance 1
    noise = torch.randn(2 * n, 1, size + 2 * radius, size + 2 * radius, device=device)
    blurred = F.conv2d(F.conv2d(noise, kernel.view(1, 1, -1, 1)), kernel.view(1, 1, 1, -1))
    return blurred.view(n, 2, size, size).permute(0, 2, 3, 1)


def warped(batch: torch.Tensor, angles: torch.Tensor, displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Image i of a float batch of square images [N, 1, S, S] turned by angles[i] radians about its centre, then
    displaced by `displacement` ([N, S, S, 2], in grid_sample's [-1, 1] units); bilinear, zeros fill in,
    channels-last. The sampling grid is built elementwise, not by affine_grid's matmul, which TF32 would round on
    a GPU (angle 0 would not be the identity there)."""
    n, _, size, width = batch.shape
    if size != width:
        raise ValueError(f"warped() needs square images, got {size}x{width}")
    # Pixel centres in [-1, 1] (align_corners=False); the output pixel (x, y) samples the input at R(angle) (x, y).
    coords = (torch.arange(size, device=batch.device, dtype=batch.dtype) * 2 + 1) / size - 1
    x, y = coords.view(1, 1, size), coords.view(1, size, 1)
    angles = angles.to(batch.dtype).view(n, 1, 1)
    cos, sin = angles.cos(), angles.sin()
    grid = torch.stack([cos * x - sin * y, sin * x + cos * y], dim=3)
    if displacement is not None:
        grid = grid + displacement.to(batch.dtype)
    sampled = F.grid_sample(batch, grid, align_corners=False)
    return sampled.contiguous(memory_format=torch.channels_last)
