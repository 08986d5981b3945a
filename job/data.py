"""MNIST: find it or download it (checksummed), load it as uint8 tensors, and make the seed article's split."""

from __future__ import annotations

import base64
import gzip
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
