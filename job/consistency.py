"""Consistency across strong augmentation (VAT_CONSISTENCY_*), beside VAT: the prediction on the weakly augmented
unlabelled image (the shifted one that VAT sees) is a target with no gradient, and a strongly augmented copy of
the same image (job/augment.py) is trained to match it.

- hard (FixMatch, Sohn et al. 2020): cross-entropy with the target's class;
- soft (UDA, Xie et al. 2020): KL divergence from the target sharpened with a temperature.
Both keep only the images whose target is confident (its top probability at least the threshold) and average over
the whole batch, a dropped image counting 0, as FixMatch does: the term grows as the model grows sure, which
stands in for a ramp of its weight (VAT_CONSISTENCY_RAMPUP_STEPS adds a real one: job/schedules.py).

The target comes from the weights being trained, or from their weight average (`targets_from_weight_average`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from job.device import autocast
from job.model import running_stats_frozen


def confident(target_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """[N] floats: 1 for the images whose predicted class has a probability of at least `threshold`, else 0."""
    top = F.softmax(target_logits.float(), dim=1).amax(dim=1)
    return (top >= threshold).float()


def sharpened(target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The target distribution softmax(logits / temperature): below 1 it is sharper than the prediction."""
    return F.softmax(target_logits.float() / temperature, dim=1)


def consistency_loss(
    strong_logits: torch.Tensor, target_logits: torch.Tensor, *, mode: str, threshold: float, temperature: float
) -> torch.Tensor:
    """Mean over the batch of the strong view's divergence from the weak view's target (`mode` hard or soft), for
    the confident targets only; no gradient reaches the target."""
    target_logits = target_logits.detach()
    keep = confident(target_logits, threshold)
    log_p = F.log_softmax(strong_logits.float(), dim=1)
    if mode == "hard":
        per_image = F.nll_loss(log_p, target_logits.argmax(dim=1), reduction="none")
    else:
        q = sharpened(target_logits, temperature)
        per_image = (torch.special.xlogy(q, q) - q * log_p).sum(dim=1)  # KL(q || p): 0 where p == q
    return (keep * per_image).mean()


@torch.no_grad()
def targets_from_weight_average(average: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The mean teacher's logits for `x` (Tarvainen and Valpola 2017), from the weight average (VAT_EMA_DECAY).

    In evaluation mode, unlike the mean-teacher paper's teacher, which ran in training mode: no dropout, so the
    target is the prediction the averaged model will ship with, not one noisy sample of it; and BatchNorm
    normalises with its averaged running statistics instead of the batch's. Training mode would also fold this
    batch into the teacher's running statistics, which are meant to be the average of the student's, and make each
    target depend on which images share its batch. The cost: early on, the running statistics lag the weights,
    which the average's warm-up (job/model.py `weight_average`) keeps to the first few dozen updates."""
    average.eval()
    return average(x)


def consistency_term(
    model: torch.nn.Module,
    strong: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    settings: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of the strongly augmented batch `strong` against the weak view's `targets`, and the share of the
    batch whose target passed the threshold (FixMatch's mask rate: how much of the batch the term trains on; it
    grows as the target's model, the trained one or its average, grows sure, and a threshold that keeps nearly
    nothing shows here). Its pass is a perturbed
    pass like VAT's: BatchNorm's running statistics as VAT_PERTURBED_BN says (frozen: the shipped statistics stay
    those of weakly augmented images), and the clean pass's dropout mask when VAT_DROPOUT_MASKS shares one, so that
    the two predictions differ by the augmentation, not by the units dropped."""
    with running_stats_frozen(model, settings.perturbed_bn == "frozen"), autocast(strong.device, settings.amp):
        logits = model(strong, mask)
    loss = consistency_loss(
        logits,
        targets,
        mode=settings.consistency_targets,
        threshold=settings.consistency_threshold,
        temperature=settings.consistency_temperature,
    )
    return loss, confident(targets.detach(), settings.consistency_threshold).mean()
