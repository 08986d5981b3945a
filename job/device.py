"""Where and how the numbers are computed: device choice, deterministic mode, precision, CUDA graphs, and the
CPU allocator setting that training relies on. Policy only; what one update computes lives in `train.py`.

Precision, decided and measured (BENCHMARKS.md): with AMP, the clean target and the power iteration run in
float32 with TF32 off, because a perturbation of norm xi=1e-6 is rounded away in half precision; the other
passes use autocast.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterator
from typing import Any

import torch


class NoGpuVisible(Exception):
    """VAT_DEVICE=cuda, and this machine shows the process no CUDA device: a fault of the node (driver, runtime,
    device plugin) more often than of the settings, so it has its own exit code, which Kubernetes retries."""


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise NoGpuVisible(
            "VAT_DEVICE='cuda': no CUDA device is visible on this node; run on a node with a working GPU, "
            "or set VAT_DEVICE to 'auto' or 'cpu'"
        )
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def configure_backend(device: torch.device, deterministic: bool) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif deterministic:
        set_deterministic_algorithms()
        # Deterministic mode also fills every new tensor with NaN (to expose reads of uninitialised memory):
        # a fifth of a CPU update. Our kernels write all they allocate, so skip that.
        torch.utils.deterministic.fill_uninitialized_memory = False


def set_deterministic_algorithms() -> None:
    """`torch.use_deterministic_algorithms(True)` without its import of torch._inductor's config.

    That import (for a compiler the job does not use) loads ~900 modules: 2 s and 148 MB of resident memory
    on the CPU, a tenth of the job's peak (BENCHMARKS.md). The flag itself lives in torch._C.
    """
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:  # a torch without the private setter: pay for the import
        torch.use_deterministic_algorithms(True)
    else:
        setter(True, warn_only=False)


# --- precision ---------------------------------------------------------------------------------------


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    # cache_enabled=False: the weight casts must be redone per pass (and cached casts break CUDA graphs).
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """float32 without TF32: the finite differences of the power iteration need every bit."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --- CUDA graphs ---------------------------------------------------------------------------------------


class GraphedUpdate:
    """Runs a whole update (batch draw, forward, backward, optimiser step) eagerly for a few warm-up steps on a
    side stream, then captures it once as a CUDA graph and replays it (PyTorch's "whole-network capture").

    The warm-up steps are real updates. A capture failure costs speed, never the run: the update goes on eagerly
    and `capture_error` says why. Scalars that change between updates must live in device tensors.
    """

    WARMUP_STEPS = 3

    def __init__(self, first_step: int = 0) -> None:
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_output: torch.Tensor | None = None
        self.capture_error = ""
        self.first_step = first_step  # the step this process started at (warm-up counts from here)

    @property
    def failed(self) -> bool:
        return bool(self.capture_error)

    def __call__(self, step: int, compute: Callable[[], torch.Tensor], zero_grad: Callable[[], None]) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            assert self.static_output is not None
            return self.static_output.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            zero_grad()
            output = compute()
        torch.cuda.current_stream().wait_stream(stream)
        if step + 1 - self.first_step >= self.WARMUP_STEPS:
            zero_grad()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.static_output = compute()
                self.graph = graph
            except RuntimeError as error:
                self.capture_error = str(error).splitlines()[0]
                torch.cuda.synchronize()
        return output


# --- the CPU allocator -----------------------------------------------------------------------------------


@contextlib.contextmanager
def host_memory_reused(device: torch.device) -> Iterator[None]:
    """While training on the CPU, make glibc keep freed blocks for reuse instead of returning them to the kernel.

    PyTorch has no caching allocator on the CPU: each 55 MB activation was a fresh mmap whose pages the kernel
    had to fault in and zero, a third of a CPU update (0.62 -> 0.42 s/update). Afterwards glibc's defaults come
    back and the heap is trimmed: the kept blocks would otherwise be scattered over by evaluation and plotting
    and raise the peak resident memory by a few hundred MB (BENCHMARKS.md).
    """
    libc = _glibc() if device.type == "cpu" else None
    if libc is None:
        yield
        return
    _mallopt(libc, mmap_threshold=2**31 - 1, trim_threshold=2**31 - 1, top_pad=1 << 28)
    try:
        yield
    finally:
        # glibc's default values (mallopt(3)); a fixed mmap threshold, so that evaluation's large blocks
        # are returned to the kernel when freed.
        _mallopt(libc, mmap_threshold=128 * 1024, trim_threshold=128 * 1024, top_pad=128 * 1024)
        libc.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl, macOS): nothing to tune
        return None


def _mallopt(libc: ctypes.CDLL, *, mmap_threshold: int, trim_threshold: int, top_pad: int) -> None:
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    for option, value in ((m_mmap_threshold, mmap_threshold), (m_trim_threshold, trim_threshold), (m_top_pad, top_pad)):
        libc.mallopt(option, value)
