"""The two training loops (labelled-only baseline, then VAT), with AMP, checkpoints, resume and stop-on-signal.

One loop serves both models; only the update differs (`baseline_losses`, `vat_losses`). Batches are
drawn on the training device from the uint8 images already there. All training randomness (batches,
dropout masks, VAT directions, strong augmentation) comes from the device's default generator, whose state
every checkpoint keeps, so a resumed run continues exactly where it stopped.

VAT's noise, decided and measured (BENCHMARKS.md):
- BatchNorm: the perturbed passes normalise with their own batch statistics but, with
  `perturbed_bn="frozen"`, leave the running statistics alone (the article lets them update them).
- Dropout: with `dropout_masks="shared"` the clean and perturbed passes use one mask, so the power iteration measures
  the effect of the perturbation, not of a different mask (the article draws anew).
- Dropout, `dropout_masks="none"`: the unlabelled passes run without dropout (the labelled pass keeps it).
Device, precision (the power iteration stays float32), CUDA graphs and the CPU allocator: `device.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from job.augment import StrongAugmentation, drawn, strongly_augmented, training_batch
from job.checkpoint import (
    HISTORY_NAMES,
    checkpoint_name,
    latest_intact_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    training_settings,
    widened_history,
)
from job.consistency import consistency_term, targets_from_weight_average
from job.data import MnistSplit, as_float_batch
from job.device import GraphedUpdate, autocast, full_precision, host_memory_reused
from job.model import DROPOUT_P, build_model, model_record, running_stats_frozen, weight_average
from job.schedules import lr_at, ramped_weights
from job.stop import Interrupted, StopFlag
from job.training_options import takes_weight_average_targets
from job.vat import entropy_with_logits, lds_loss, marginal_entropy_with_logits


@dataclass
class PhaseResult:
    name: str
    model: nn.Module  # evaluated and shipped: the weight average with VAT_EMA_DECAY, else the last weights
    last_weights: nn.Module
    steps: int
    train_seconds: float
    history: dict[str, list[float]]
    resumed_from: int | None


@dataclass
class Hooks:
    """What the loop reports to the outside: logging and a new checkpoint (uploads, and pruning the bucket)."""

    log: Any
    on_checkpoint: Callable[[Path], None] = lambda path: None
    on_corrupt: Callable[[Path, Exception], None] = lambda path, error: None
    on_progress: Callable[..., None] = lambda phase, done, total, rate, lr, losses: None  # job.progress.Progress


class Trainer:
    """Holds a phase's model, optimiser and data; `update()` performs one step and returns its HISTORY_NAMES."""

    def __init__(self, phase: str, settings: Any, data: MnistSplit, device: torch.device) -> None:
        self.phase, self.s, self.data, self.device = phase, settings, data, device
        self.total_steps = settings.baseline_steps if phase == "baseline" else settings.train_steps
        torch.manual_seed(settings.seed + (0 if phase == "baseline" else 1))
        # channels_last: oneDNN's and cuDNN's fast convolution and pooling layout (x1.4 per update on CPU).
        self.model = build_model(settings.hidden_units, settings.model).to(device, memory_format=torch.channels_last)
        use_graphs = device.type == "cuda" and settings.cuda_graphs and settings.amp != "fp16"
        lr: float | torch.Tensor = torch.tensor(settings.lr, device=device) if use_graphs else settings.lr
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=lr, **({"fused": True, "capturable": True} if use_graphs else {})
        )
        # The ramped weights change from update to update: on the device under CUDA graphs (a replay reads them).
        self.ramped = {
            term: torch.zeros((), device=device) if use_graphs else 0.0 for term in ("entmin", "consistency")
        }
        self.scaler = torch.amp.GradScaler(device.type, enabled=settings.amp == "fp16")
        self.graphed = GraphedUpdate() if use_graphs else None
        self.ema = weight_average(self.model, settings.ema_decay) if phase == "vat" and settings.ema_decay else None
        self.strong = StrongAugmentation.from_settings(settings)
        self.teacher_needed = self.ema is not None and takes_weight_average_targets(settings)

    def batch(self, indices: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.s
        return training_batch(self.data.train_images, indices, size, s.translate_px, s.rotate_deg, s.elastic_px)

    @property
    def shipped_model(self) -> nn.Module:
        """The model that is evaluated and saved as model.pt: the weight average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def _labeled_loss(self) -> torch.Tensor:
        if self.s.labeled_augment == "strong":  # instead of the weak transform, not on top of it
            idx = drawn(self.data.labeled, self.s.labeled_batch_size)
            x = strongly_augmented(self.data.train_images[idx], self.strong)
        else:
            x, idx = self.batch(self.data.labeled, self.s.labeled_batch_size)
        with autocast(self.device, self.s.amp):
            logits = self.model(x)
        return F.cross_entropy(logits.float(), self.data.train_labels[idx])

    def baseline_losses(self) -> torch.Tensor:
        ce = self._labeled_loss()
        self._backward(ce)
        self._step()
        return torch.cat([ce.detach().view(1), ce.new_zeros(len(HISTORY_NAMES) - 1)])

    def vat_losses(self) -> torch.Tensor:
        s, model = self.s, self.model
        # Each term is backpropagated as soon as it exists (the gradients add up the same way), so no graph
        # waits in memory while the next one is built (lower peak memory, BENCHMARKS.md).
        ce = self._labeled_loss()
        self._backward(ce)
        xu, unlabeled = self.batch(self.data.unlabeled, s.unlabeled_batch_size)
        mask = None  # "independent": each pass draws its own, as nn.Dropout would
        if s.dropout_masks != "independent":
            mask = model.dropout_mask(len(xu), xu, p=0.0 if s.dropout_masks == "none" else DROPOUT_P)

        def forward(z: torch.Tensor) -> torch.Tensor:
            with autocast(self.device, s.amp):
                return model(z, mask)

        def power_forward(z: torch.Tensor) -> torch.Tensor:
            with full_precision(self.device):
                return model(z, mask)

        with full_precision(self.device), torch.set_grad_enabled(s.entmin_weight > 0 or s.balance_weight > 0):
            clean_logits = model(xu, mask)
        entropy = torch.zeros((), device=self.device)
        if clean_logits.requires_grad:
            entropy = entropy_with_logits(clean_logits)
            balance = marginal_entropy_with_logits(clean_logits)  # maximised: the batch's classes stay spread
            self._backward(self.ramped["entmin"] * entropy - s.balance_weight * balance)
        targets = {"model": clean_logits}  # EntMin's term above stays the model's own
        if self.teacher_needed:
            with full_precision(self.device):
                targets["weight_average"] = targets_from_weight_average(self.ema.module, xu)
        lds = consistency = confident = torch.zeros((), device=self.device)  # what a term that is off adds
        if s.vat_weight:  # VAT_VAT_WEIGHT=0: consistency alone (FixMatch, UDA), without VAT's two passes
            with running_stats_frozen(model, s.perturbed_bn == "frozen"):
                lds = lds_loss(
                    forward,
                    xu,
                    clean_logits,
                    epsilon=s.epsilon,
                    epsilon_scaling=s.epsilon_scaling,
                    xi=s.xi,
                    power_iterations=s.power_iterations,
                    power_forward=power_forward,
                    target_logits=targets[s.vat_targets_from],
                )
            self._backward(s.vat_weight * lds)
        if s.consistency_weight:
            strong = strongly_augmented(self.data.train_images[unlabeled], self.strong)  # the same images
            consistency, confident = consistency_term(model, strong, targets[s.consistency_targets_from], mask, s)
            self._backward(self.ramped["consistency"] * consistency)
        self._step()
        return torch.stack([ce.detach(), lds.detach(), entropy.detach(), consistency.detach(), confident])

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
        for term, weight in ramped_weights(step, self.s).items():
            held = self.ramped[term]
            self.ramped[term] = held.fill_(weight) if isinstance(held, torch.Tensor) else weight
        compute = self.baseline_losses if self.phase == "baseline" else self.vat_losses
        if self.graphed is None or self.graphed.failed:
            self.optimizer.zero_grad(set_to_none=True)
            losses = compute()
        else:
            losses = self.graphed(step, compute, zero_grad=lambda: self.optimizer.zero_grad(set_to_none=True))
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return losses

    # --- checkpoints ---------------------------------------------------------------------------

    def state(self, step: int, history: torch.Tensor, seconds: float) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "step": step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
            "history": history[:step].cpu(),
            "train_seconds": seconds,
            "settings": training_settings(self.phase, self.s),
        }

    def restore(self, state: dict[str, Any]) -> tuple[int, torch.Tensor, float]:
        """Continue from a checkpoint that `latest_intact_checkpoint` accepted (settings and shapes checked)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and state["rng_cuda"] is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
        if self.graphed is not None:
            self.graphed.first_step = state["step"]
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
    history = torch.zeros(total, len(HISTORY_NAMES), device=device)
    start, seconds, resumed_from = 0, 0.0, None

    saved = latest_intact_checkpoint(folder, hooks.on_corrupt, (phase, trainer.model.state_dict(), settings))
    if saved is not None:
        start, old_history, seconds = trainer.restore(saved)
        history[:start] = widened_history(old_history, settings.consistency_weight > 0).to(device)
        resumed_from = start
        log.info("resumed", phase=phase, step=start, of=total)

    def checkpoint(step: int) -> Path:
        path = folder / checkpoint_name(step)
        save_checkpoint(path, trainer.state(step, history, seconds + time.perf_counter() - began))
        prune_checkpoints(folder, step, settings.keep_checkpoints)  # first: then the upload hook prunes the bucket
        hooks.on_checkpoint(path)
        return path

    trainer.model.train()
    began = last_log = time.perf_counter()
    last_logged_step = start
    if start < total:
        log.info(
            "training_started", phase=phase, steps=total, device=str(device), cuda_graphs=trainer.graphed is not None
        )
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
            losses = dict(zip(HISTORY_NAMES, history[step].tolist(), strict=True))
            hooks.on_progress(phase, done, total, rate, lr_at(step, total, settings.lr, settings.lr_decay), losses)
            last_log, last_logged_step = now, done
    if device.type == "cuda":
        torch.cuda.synchronize()
    if trainer.graphed is not None and trainer.graphed.failed:
        log.warning("cuda_graph_capture_failed", phase=phase, error=trainer.graphed.capture_error, fallback="eager")
    if phase == "vat" and settings.bn_reestimate and start < total:
        reestimate_batchnorm(trainer.shipped_model, data, settings.unlabeled_batch_size)
        log.info("batchnorm_reestimated", phase=phase, images=len(data.unlabeled))
    seconds += time.perf_counter() - began
    if start < total:
        checkpoint(total)
    if start < total or not (folder / "model.pt").exists():
        save_final_model(trainer.shipped_model, folder / "model.pt", hooks)
    trainer.model.eval()
    trainer.shipped_model.eval()
    return PhaseResult(
        name=phase,
        model=trainer.shipped_model,
        last_weights=trainer.model,
        steps=total,
        train_seconds=round(seconds, 3),
        history={name: column.tolist() for name, column in zip(HISTORY_NAMES, history.cpu().T, strict=True)},
        resumed_from=resumed_from,
    )


def reestimate_batchnorm(model: nn.Module, data: MnistSplit, batch_size: int) -> None:
    """Replace BatchNorm's running statistics (an exponential average over the last updates, which mixed
    labelled and unlabelled batches) by their average over all clean unlabelled images under the final weights."""
    images = data.train_images[data.unlabeled]
    starts = range(0, len(images), batch_size)
    batches = (as_float_batch(images[i : i + batch_size], channels_last=True) for i in starts)
    torch.optim.swa_utils.update_bn(batches, model)


def save_final_model(model: nn.Module, path: Path, hooks: Hooks) -> None:
    # The network and its width travel with the weights: whoever loads model.pt builds the same (model_from_record).
    save_checkpoint(path, {"model": model.state_dict(), "step": -1, **model_record(model)})
    hooks.on_checkpoint(path)
