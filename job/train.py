"""The two training loops (labelled-only baseline, then VAT), with AMP, checkpoints, resume and stop-on-signal.

One loop serves both models; only the update differs (`baseline_losses`, `vat_losses`). Batches are
drawn on the training device from the uint8 images already there. All training randomness (batches,
dropout masks, VAT directions) comes from the device's default generator, whose state every checkpoint
keeps, so a resumed run continues exactly where it stopped.

VAT's noise, decided and measured (BENCHMARKS.md):
- BatchNorm: the perturbed passes normalise with their own batch statistics but, with
  `perturbed_bn="frozen"`, leave the running statistics alone (the article lets them update them).
- Dropout: with `dropout_masks="shared"` the clean and perturbed passes use one mask, so the power
  iteration measures the effect of the perturbation, not of a different mask (the article draws anew).
- Dropout, `dropout_masks="none"`: the unlabelled passes run without dropout (the labelled pass keeps it).
- Mixed precision: the clean target and the power iteration run in float32 with TF32 off, because a
  perturbation of norm xi=1e-6 is rounded away in half precision; the other passes use autocast.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from job.checkpoint import CheckpointError, checkpoint_name, latest_intact_checkpoint, load_checkpoint, save_checkpoint
from job.data import MnistSplit, as_float_batch
from job.model import DROPOUT_P, build_model
from job.settings import ConfigError
from job.vat import entropy_with_logits, lds_loss

LOSS_NAMES = ("cross_entropy", "lds", "entropy")

# Settings that change what a phase computes: a run resumed with other values would mix two experiments.
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
        "xi",
        "power_iterations",
        "vat_weight",
        "entmin_weight",
        "entmin_rampup_steps",
        "perturbed_bn",
        "dropout_masks",
        "bn_reestimate",
    ),
}


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint at `step`."""

    def __init__(self, phase: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"{phase} stopped at step {step} on a signal; checkpoint {checkpoint}")
        self.phase, self.step, self.checkpoint = phase, step, checkpoint


class ResumeMismatch(Exception):
    """The run folder holds checkpoints made with other training settings."""


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between updates and checkpoints before leaving."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name = ""

    def set(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.set)
        signal.signal(signal.SIGINT, self.set)


@dataclass
class PhaseResult:
    name: str
    model: nn.Module
    steps: int
    train_seconds: float
    history: dict[str, list[float]]
    resumed_from: int | None


@dataclass
class Hooks:
    """What the loop reports to the outside: logging and a new checkpoint (uploads attach here)."""

    log: Any
    on_checkpoint: Callable[[Path], None] = lambda path: None
    on_corrupt: Callable[[Path, Exception], None] = lambda path, error: None


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("VAT_DEVICE='cuda': no CUDA device is visible; use 'auto' or 'cpu', or run on a GPU node")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


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


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module, frozen: bool) -> Iterator[None]:
    """BatchNorm still normalises with the batch's statistics but does not fold them into its running ones."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if frozen else []
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = True


def draw(indices: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A uniform batch without replacement (all of `indices`, in order, when the batch is that large)."""
    if batch_size >= len(indices):
        return indices
    return indices[torch.rand(len(indices), device=indices.device).topk(batch_size, sorted=False).indices]


def lr_at(step: int, total: int, lr: float, decay: str) -> float:
    return lr * (1.0 - step / total) if decay == "linear" else lr


def entmin_weight_at(step: int, weight: float, rampup_steps: int) -> float:
    """EntMin's weight: rising linearly over the first `rampup_steps` updates, so that it sharpens predictions
    once VAT has made them mostly right (at full weight from the start it can merge two classes)."""
    return weight * min(1.0, step / rampup_steps) if rampup_steps else weight


class Trainer:
    """Holds a phase's model, optimiser and data; `update()` performs one training step and returns its losses."""

    def __init__(self, phase: str, settings: Any, data: MnistSplit, device: torch.device) -> None:
        self.phase, self.s, self.data, self.device = phase, settings, data, device
        self.total_steps = settings.baseline_steps if phase == "baseline" else settings.train_steps
        torch.manual_seed(settings.seed + (0 if phase == "baseline" else 1))
        # channels_last: oneDNN's and cuDNN's fast convolution and pooling layout (x1.4 per update on CPU).
        self.model = build_model().to(device, memory_format=torch.channels_last)
        self.use_graphs = device.type == "cuda" and settings.cuda_graphs and settings.amp != "fp16"
        lr: float | torch.Tensor = torch.tensor(settings.lr, device=device) if self.use_graphs else settings.lr
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=lr, **({"fused": True, "capturable": True} if self.use_graphs else {})
        )
        # Scalars that change from update to update live on the device under CUDA graphs (a replay reads them).
        self.entmin_scale: float | torch.Tensor = torch.zeros((), device=device) if self.use_graphs else 0.0
        self.scaler = torch.amp.GradScaler(device.type, enabled=settings.amp == "fp16")
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_losses: torch.Tensor | None = None
        self.capture_error = ""  # why CUDA graph capture failed, if it did
        self._first_step = 0  # the step this process started at (warm-up counts from here)

    # --- the two updates -------------------------------------------------------------------------

    def _labeled_loss(self) -> torch.Tensor:
        idx = draw(self.data.labeled, self.s.labeled_batch_size)
        with autocast(self.device, self.s.amp):
            logits = self.model(as_float_batch(self.data.train_images[idx], channels_last=True))
        return F.cross_entropy(logits.float(), self.data.train_labels[idx])

    def baseline_losses(self) -> torch.Tensor:
        ce = self._labeled_loss()
        zero = torch.zeros((), device=self.device)
        self._backward(ce)
        self._step()
        return torch.stack([ce.detach(), zero, zero])

    def vat_losses(self) -> torch.Tensor:
        s, model = self.s, self.model
        # Each term is backpropagated as soon as it exists (the gradients add up the same way), so no graph
        # waits in memory while the next one is built (lower peak memory, BENCHMARKS.md).
        ce = self._labeled_loss()
        self._backward(ce)
        xu = as_float_batch(
            self.data.train_images[draw(self.data.unlabeled, s.unlabeled_batch_size)], channels_last=True
        )
        mask = None  # "independent": each pass draws its own, as nn.Dropout would
        if s.dropout_masks != "independent":
            mask = model.dropout_mask(len(xu), xu, p=0.0 if s.dropout_masks == "none" else DROPOUT_P)

        def forward(z: torch.Tensor) -> torch.Tensor:
            with autocast(self.device, s.amp):
                return model(z, mask)

        def power_forward(z: torch.Tensor) -> torch.Tensor:
            with full_precision(self.device):
                return model(z, mask)

        with full_precision(self.device), torch.set_grad_enabled(s.entmin_weight > 0):
            clean_logits = model(xu, mask)
        if s.entmin_weight > 0:
            entropy = entropy_with_logits(clean_logits)
            self._backward(self.entmin_scale * entropy)
        else:
            entropy = torch.zeros((), device=self.device)
        with running_stats_frozen(model, s.perturbed_bn == "frozen"):
            lds = lds_loss(
                forward,
                xu,
                clean_logits,
                epsilon=s.epsilon,
                xi=s.xi,
                power_iterations=s.power_iterations,
                power_forward=power_forward,
            )
        self._backward(s.vat_weight * lds)
        self._step()
        return torch.stack([ce.detach(), lds.detach(), entropy.detach()])

    def _backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def _step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()

    # --- one step, eager or replayed from a CUDA graph ---------------------------------------------

    def update(self, step: int) -> torch.Tensor:
        lr = lr_at(step, self.total_steps, self.s.lr, self.s.lr_decay)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        entmin = entmin_weight_at(step, self.s.entmin_weight, self.s.entmin_rampup_steps)
        if isinstance(self.entmin_scale, torch.Tensor):
            self.entmin_scale.fill_(entmin)
        else:
            self.entmin_scale = entmin
        compute = self.baseline_losses if self.phase == "baseline" else self.vat_losses
        if not self.use_graphs:
            self.optimizer.zero_grad(set_to_none=True)
            return compute()
        if self.graph is not None:
            self.graph.replay()
            assert self.static_losses is not None
            return self.static_losses.clone()
        return self._warm_up_or_capture(step, compute)

    def _warm_up_or_capture(self, step: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        # The whole update (batch draw, forward, backward, Adam) becomes one CUDA graph after a few eager
        # steps on a side stream (PyTorch's "whole-network capture"); the eager steps are real updates.
        warmup_steps = 3
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.optimizer.zero_grad(set_to_none=True)
            losses = compute()
        torch.cuda.current_stream().wait_stream(stream)
        if step + 1 - self._first_step >= warmup_steps:
            self.optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.static_losses = compute()
                self.graph = graph
            except RuntimeError as error:  # a capture problem costs speed, never the run
                self.use_graphs, self.capture_error = False, str(error).splitlines()[0]
                torch.cuda.synchronize()
        return losses

    # --- checkpoints ---------------------------------------------------------------------------

    def state(self, step: int, history: torch.Tensor, seconds: float) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "step": step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
            "history": history[:step].cpu(),
            "train_seconds": seconds,
            "settings": {k: getattr(self.s, k) for k in TRAINING_FIELDS[self.phase]},
        }

    def restore(self, state: dict[str, Any]) -> tuple[int, torch.Tensor, float]:
        mismatched = {k: (v, getattr(self.s, k)) for k, v in state["settings"].items() if getattr(self.s, k) != v}
        if mismatched:
            what = ", ".join(f"VAT_{k.upper()} was {old!r}, now {new!r}" for k, (old, new) in mismatched.items())
            raise ResumeMismatch(
                f"{self.phase} checkpoints of this run were made with other settings ({what}); "
                "use a new VAT_RUN_ID or the old settings"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and state["rng_cuda"] is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
        self._first_step = state["step"]
        return state["step"], state["history"], float(state["train_seconds"])


def train_phase(
    phase: str, settings: Any, data: MnistSplit, device: torch.device, folder: Path, stop: StopFlag, hooks: Hooks
) -> PhaseResult:
    """Train one model to its step budget, resuming from the newest intact checkpoint in `folder`."""
    with host_memory_reused(device):
        return _train_phase(phase, settings, data, device, folder, stop, hooks)


def _train_phase(
    phase: str, settings: Any, data: MnistSplit, device: torch.device, folder: Path, stop: StopFlag, hooks: Hooks
) -> PhaseResult:
    trainer = Trainer(phase, settings, data, device)
    total, log = trainer.total_steps, hooks.log
    history = torch.zeros(total, len(LOSS_NAMES), device=device)
    start, seconds, resumed_from = 0, 0.0, None

    saved = latest_intact_checkpoint(folder, hooks.on_corrupt)
    if saved is not None:
        start, old_history, seconds = trainer.restore(saved)
        history[:start] = old_history.to(device)
        resumed_from = start
        log.info("resumed", phase=phase, step=start, of=total)

    def checkpoint(step: int) -> Path:
        path = folder / checkpoint_name(step)
        save_checkpoint(path, trainer.state(step, history, seconds + time.perf_counter() - began))
        hooks.on_checkpoint(path)
        return path

    trainer.model.train()
    began = last_log = time.perf_counter()
    last_logged_step = start
    if start < total:
        log.info("training_started", phase=phase, steps=total, device=str(device), cuda_graphs=trainer.use_graphs)
    for step in range(start, total):
        history[step] = trainer.update(step)
        done = step + 1
        now = time.perf_counter()
        if done % settings.checkpoint_every == 0 and done < total:
            checkpoint(done)
        if stop.is_set() and done < total:
            path = checkpoint(done)
            raise Interrupted(phase, done, path)
        if now - last_log >= settings.log_every_s:
            rate = (done - last_logged_step) / (now - last_log)
            losses = dict(zip(LOSS_NAMES, history[step].tolist(), strict=True))
            log.info(
                "progress",
                phase=phase,
                step=done,
                of=total,
                steps_per_s=round(rate, 2),
                eta_s=round((total - done) / rate, 1),
                lr=float(f"{lr_at(step, total, settings.lr, settings.lr_decay):.3g}"),
                **{k: round(v, 5) for k, v in losses.items()},
            )
            last_log, last_logged_step = now, done
    if device.type == "cuda":
        torch.cuda.synchronize()
    if trainer.capture_error:
        log.warning("cuda_graph_capture_failed", phase=phase, error=trainer.capture_error, fallback="eager updates")
    if phase == "vat" and settings.bn_reestimate and start < total:
        reestimate_batchnorm(trainer.model, data, settings.unlabeled_batch_size)
        log.info("batchnorm_reestimated", phase=phase, images=len(data.unlabeled))
    seconds += time.perf_counter() - began
    if start < total:
        checkpoint(total)
    if start < total or not (folder / "model.pt").exists():
        save_final_model(trainer.model, folder / "model.pt", hooks)
    trainer.model.eval()
    hist = history.cpu()
    return PhaseResult(
        name=phase,
        model=trainer.model,
        steps=total,
        train_seconds=round(seconds, 3),
        history={name: hist[:, i].tolist() for i, name in enumerate(LOSS_NAMES)},
        resumed_from=resumed_from,
    )


def reestimate_batchnorm(model: nn.Module, data: MnistSplit, batch_size: int) -> None:
    """Replace BatchNorm's running statistics (an exponential average over the last updates, which mixed
    labelled and unlabelled batches) by their average over all clean unlabelled images under the final weights."""
    images = data.train_images[data.unlabeled]
    batches = (
        as_float_batch(images[i : i + batch_size], channels_last=True) for i in range(0, len(images), batch_size)
    )
    torch.optim.swa_utils.update_bn(batches, model)


def save_final_model(model: nn.Module, path: Path, hooks: Hooks) -> None:
    save_checkpoint(path, {"model": model.state_dict(), "step": -1})
    hooks.on_checkpoint(path)


__all__ = [
    "CheckpointError",
    "Hooks",
    "Interrupted",
    "PhaseResult",
    "ResumeMismatch",
    "StopFlag",
    "Trainer",
    "configure_backend",
    "load_checkpoint",
    "resolve_device",
    "train_phase",
]
