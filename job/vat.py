"""Virtual adversarial training's loss: the local distributional smoothness (LDS) of Miyato et al.

LDS(x) = KL(p(y|x) || p(y|x + r_adv)), where r_adv is the direction in which a tiny input change moves
the prediction most (found by finite-difference power iteration on the KL's Hessian), scaled to L2 norm
epsilon per example. Everything stays on the device; the power iteration differentiates with respect to
the perturbation only, never the weights; the clean prediction is a constant target.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

Forward = Callable[[torch.Tensor], torch.Tensor]


def kl_with_logits(q_logits: torch.Tensor, p_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(q || p), both given as logits; computed in float32."""
    q_log = F.log_softmax(q_logits.float(), dim=1)
    p_log = F.log_softmax(p_logits.float(), dim=1)
    return (q_log.exp() * (q_log - p_log)).sum(dim=1).mean()


def entropy_with_logits(logits: torch.Tensor) -> torch.Tensor:
    """Mean prediction entropy (the EntMin term of VAT+EntMin)."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def marginal_entropy_with_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the batch's mean prediction: maximised, it keeps the classes balanced (IMSAT's H(Y); with
    EntMin's H(Y|X) minimised, the two make the mutual information between images and classes)."""
    mean_p = F.softmax(logits.float(), dim=1).mean(dim=0)
    return -(mean_p * mean_p.clamp_min(1e-12).log()).sum()


def l2_normalize(d: torch.Tensor) -> torch.Tensor:
    """Scale every example of `d` to unit L2 norm (dividing by the max first keeps tiny gradients finite)."""
    flat = d.flatten(1)
    flat = flat / flat.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return flat.reshape(d.shape)


def adversarial_direction(
    power_forward: Forward, x: torch.Tensor, clean_logits: torch.Tensor, xi: float, power_iterations: int
) -> torch.Tensor:
    """Unit-norm (per example) direction that increases KL(p(x) || p(x + r)) fastest."""
    d = torch.randn_like(x)
    for _ in range(power_iterations):
        d = (xi * l2_normalize(d)).requires_grad_()
        divergence = kl_with_logits(clean_logits, power_forward(x + d))
        (d,) = torch.autograd.grad(divergence, d)
    return l2_normalize(d)


def lds_loss(
    forward: Forward,
    x: torch.Tensor,
    clean_logits: torch.Tensor,
    *,
    epsilon: float,
    xi: float,
    power_iterations: int,
    power_forward: Forward | None = None,
    epsilon_scaling: str = "fixed",
    target_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """The VAT regulariser for the unlabelled batch `x`.

    `forward` is the pass that the weights are trained through; `power_forward` (default: the same) is
    the pass used inside the power iteration, where a perturbation of norm `xi` must not be rounded away
    (the caller runs it in float32 when the rest is in mixed precision). With `epsilon_scaling="input_norm"`
    each example's radius is `epsilon` times its L2 norm over the batch's mean norm (same mean radius; a thin
    digit, a 1 with about 0.77 of the mean norm, is not pushed as far as a bold 0); "fixed": `epsilon` for all.
    `target_logits` (default: `clean_logits`) is what the perturbed prediction is pulled towards, e.g. a mean
    teacher's; the direction is always found against the model's own clean prediction, since the power
    iteration needs a divergence that is zero at r = 0 (against another target its gradient there swamps Hd).
    """
    clean_logits = clean_logits.detach()
    direction = adversarial_direction(power_forward or forward, x, clean_logits, xi, power_iterations)
    radius: float | torch.Tensor = epsilon
    if epsilon_scaling == "input_norm":
        norms = x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
        radius = epsilon * norms / norms.mean().clamp_min(1e-12)
    target = clean_logits if target_logits is None else target_logits.detach()
    return kl_with_logits(target, forward(x + radius * direction))
