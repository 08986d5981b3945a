import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch

from job.data import DataError, ensure_mnist, load_mnist, raw_dir, read_idx, seeded_split
from tests.support import Mirror, dead_url, events, job_env, run_job

ARTICLE_CLASS_COUNTS = [11, 10, 10, 10, 9, 8, 10, 11, 10, 11]


# --- the seeded split ------------------------------------------------------------------------------


def test_default_split_has_the_articles_class_counts_and_sizes(mnist_split):
    assert mnist_split.labeled_class_counts() == ARTICLE_CLASS_COUNTS
    assert (len(mnist_split.labeled), len(mnist_split.unlabeled), len(mnist_split.seeded_test)) == (100, 49_900, 10_000)
    every = torch.cat([mnist_split.labeled, mnist_split.unlabeled, mnist_split.seeded_test])
    assert torch.equal(every.sort().values, torch.arange(60_000)), "the three parts partition the training set"


@pytest.mark.slow
def test_split_is_the_articles_own_procedure_on_the_dataset_object(mnist_dir, mnist_split):
    """Run the article's code path (train_test_split over torchvision's MNIST dataset) and compare every image, in
    order: the labelled set, the seeded test set and the whole unlabelled pool."""
    from sklearn.model_selection import train_test_split
    from torchvision import datasets, transforms

    dataset = datasets.MNIST(str(mnist_dir), train=True, download=False, transform=transforms.ToTensor())
    label_unlabel_set, test_set = train_test_split(dataset, random_state=42, test_size=10000)
    label_set, unlabel_set = train_test_split(label_unlabel_set, random_state=1, test_size=49900)

    article_labels = torch.tensor([label for _, label in label_set])
    assert torch.equal(article_labels, mnist_split.train_labels[mnist_split.labeled])
    for ours, theirs in (
        (mnist_split.labeled, label_set),
        (mnist_split.seeded_test, test_set),
        (mnist_split.unlabeled, unlabel_set),
    ):
        assert len(ours) == len(theirs)
        images = mnist_split.train_images[ours].unsqueeze(1).float() / 255
        for start in range(0, len(theirs), 5000):
            chunk = torch.stack([image for image, _ in theirs[start : start + 5000]])
            assert torch.equal(chunk, images[start : start + 5000]), start


def test_other_seeds_give_other_labelled_sets_and_smaller_pools_are_prefixes():
    a, pool, test_a = seeded_split(60_000, 42, 1, 100)
    b, _, test_b = seeded_split(60_000, 42, 2, 100)
    assert set(a.tolist()) != set(b.tolist())
    assert np.array_equal(test_a, test_b), "the label seed does not move the seeded test set"
    for size in (500, 5_000):
        labeled, smaller, test = seeded_split(60_000, 42, 1, 100, num_unlabeled=size)
        assert np.array_equal(smaller, pool[:size]), "a smaller pool is the start of the larger one, in order"
        assert np.array_equal(labeled, a) and np.array_equal(test, test_a), "nothing else moves"
    assert not set(pool.tolist()) & set(a.tolist()), "no labelled image is in the unlabelled set"


# --- download against a loopback server ------------------------------------------------------------


def idx_images(n: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return struct.pack(">IIII", 2051, n, 28, 28) + pixels.tobytes()


def idx_labels(n: int, seed: int) -> bytes:
    return struct.pack(">II", 2049, n) + np.random.default_rng(seed).integers(0, 10, n, dtype=np.uint8).tobytes()


TINY = {
    "train-images-idx3-ubyte": idx_images(20, 1),
    "train-labels-idx1-ubyte": idx_labels(20, 2),
    "t10k-images-idx3-ubyte": idx_images(5, 3),
    "t10k-labels-idx1-ubyte": idx_labels(5, 4),
}
TINY_SHA = {name: hashlib.sha256(content).hexdigest() for name, content in TINY.items()}


@pytest.fixture
def mirrors():
    """Start a Mirror (tests/support.py) serving each file gzipped, as MNIST's mirrors do: <name>.gz."""
    started = []

    def start(files):
        mirror = Mirror({f"{name}.gz": gzip.compress(content, compresslevel=1) for name, content in files.items()})
        started.append(mirror)
        return mirror

    yield start
    for mirror in started:
        mirror.close()


def fetch(data_dir, urls, **kw):
    events = []
    kw.setdefault("retries", 2)
    folder = ensure_mnist(
        data_dir,
        urls,
        expected=TINY_SHA,
        backoff_s=0.01,
        timeout_s=5,
        on_event=lambda event, **f: events.append(event),
        **kw,
    )
    return folder, events


def test_missing_files_are_downloaded_verified_and_readable(tmp_path, mirrors):
    good = mirrors(TINY)
    folder, _ = fetch(tmp_path / "data", [good.url])
    assert folder == raw_dir(tmp_path / "data")
    for name, content in TINY.items():
        assert (folder / name).read_bytes() == content
    assert list(folder.iterdir()) and not [p for p in folder.iterdir() if p.name.startswith(".")], "no temp files left"


def test_dead_mirror_and_corrupt_copy_fall_back_to_a_good_mirror(tmp_path, mirrors):
    corrupt = dict(TINY)
    corrupt["train-images-idx3-ubyte"] = TINY["train-images-idx3-ubyte"][:-7] + b"garbage"
    bad, good = mirrors(corrupt), mirrors(TINY)
    folder, events = fetch(tmp_path / "data", [dead_url(), bad.url, good.url])
    assert (folder / "train-images-idx3-ubyte").read_bytes() == TINY["train-images-idx3-ubyte"]
    assert "mnist_download_failed" in events
    assert len([r for r in bad.requests if "train-images" in r]) == 2, "the corrupt copy was retried, then skipped"


def test_truncated_local_file_is_detected_and_fetched_again(tmp_path, mirrors):
    good = mirrors(TINY)
    folder, _ = fetch(tmp_path / "data", [good.url])
    (folder / "t10k-images-idx3-ubyte").write_bytes(TINY["t10k-images-idx3-ubyte"][:100])
    good.requests.clear()
    _, events = fetch(tmp_path / "data", [good.url])
    assert events[0] == "mnist_file_corrupt"
    assert good.requests == ["/t10k-images-idx3-ubyte.gz"], "only the broken file is downloaded again"
    assert (folder / "t10k-images-idx3-ubyte").read_bytes() == TINY["t10k-images-idx3-ubyte"]


def test_no_working_mirror_fails_with_a_clear_message_and_leaves_nothing(tmp_path):
    with pytest.raises(DataError, match="could not download train-images-idx3-ubyte from any mirror"):
        fetch(tmp_path / "data", [dead_url(), dead_url()])
    folder = raw_dir(tmp_path / "data")
    assert not folder.exists() or not any(folder.iterdir())


@pytest.mark.slow
def test_job_downloads_real_mnist_from_a_loopback_mirror(tmp_path, mirrors, mnist_dir):
    real = {p.name: p.read_bytes() for p in raw_dir(mnist_dir).iterdir() if p.name.endswith("ubyte")}
    good = mirrors(real)
    env = job_env(
        tmp_path,
        tmp_path / "data",
        BASELINE_STEPS=0,
        TRAIN_STEPS=0,
        MNIST_MIRRORS=f'["{dead_url()}", "{good.url}"]',
        DOWNLOAD_RETRIES=1,
    )
    result = run_job(env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for name, content in real.items():
        assert (raw_dir(tmp_path / "data") / name).read_bytes() == content
    levels = {(r["event"], r["level"]) for r in events(result.stdout) if r["event"].startswith("mnist_")}
    assert levels == {("mnist_download_failed", "warning"), ("mnist_file_downloaded", "info")}  # news is not a warning


def test_unreadable_idx_is_a_data_error(tmp_path):
    folder = raw_dir(tmp_path)
    folder.mkdir(parents=True)
    for name, content in TINY.items():
        (folder / name).write_bytes(content)
    with pytest.raises(DataError, match="training images, expected 60000"):
        load_mnist(folder, 42, 1, 100)


def test_idx_reader_matches_torchvisions_on_real_mnist(mnist_dir):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    folder = raw_dir(mnist_dir)
    for name, dims, reference in (
        ("t10k-images-idx3-ubyte", 3, read_image_file),
        ("t10k-labels-idx1-ubyte", 1, read_label_file),
    ):
        ours = read_idx(folder / name, dims)
        assert ours.dtype == torch.uint8 and torch.equal(ours.long(), reference(str(folder / name)).long())


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (TINY["train-images-idx3-ubyte"][:-1], "size does not match"),
        (TINY["train-images-idx3-ubyte"] + b"\0", "size does not match"),
        (TINY["train-labels-idx1-ubyte"], "not an IDX file of 3-dimensional"),
        (b"\0\0", "not an IDX file"),
    ],
)
def test_idx_reader_refuses_truncated_padded_or_foreign_files(tmp_path, content, problem):
    folder = raw_dir(tmp_path)
    folder.mkdir(parents=True)
    for name, good in TINY.items():
        (folder / name).write_bytes(good)
    (folder / "train-images-idx3-ubyte").write_bytes(content)
    with pytest.raises(DataError, match=problem):
        load_mnist(folder, 42, 1, 100)
