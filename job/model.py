"""The seed article's CNN: two conv-BN-ReLU-pool blocks (32, 64 channels), FC 3136-100, dropout 0.5, FC 100-10.
The hidden layer's width is a setting (VAT_HIDDEN_UNITS, default 1,024, beyond the article; VAT_PRESET=article: 100).
Also: BatchNorm with frozen running statistics (for the perturbed passes) and the weight average (VAT_EMA_DECAY).

Two changes compute the same function faster or let VAT control its noise:
- max-pooling runs before ReLU. ReLU is monotonic, so max(relu(a), relu(b)) == relu(max(a, b)), and the
  ReLU then touches a quarter of the data (the article's order is BN -> ReLU -> pool).
- dropout takes an optional mask, so a VAT step can use one mask for the clean and the perturbed
  passes (with no mask given it draws one, exactly like nn.Dropout in training mode).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

ARTICLE_HIDDEN = 100
DROPOUT_P = 0.5


class ArticleCNN(nn.Module):
    def __init__(self, hidden_units: int = ARTICLE_HIDDEN, num_classes: int = 10) -> None:
        super().__init__()
        self.hidden_units = hidden_units
        self.conv1 = nn.Conv2d(1, 32, kernel_size=4, padding=2)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=4, padding=2)
        self.bn2 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(7 * 7 * 64, hidden_units)
        self.fc2 = nn.Linear(hidden_units, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The article's initialisation: N(0, 0.02) weights and zero biases for conv and linear layers."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.zeros_(module.bias)

    def dropout_mask(self, batch_size: int, like: torch.Tensor, p: float = DROPOUT_P) -> torch.Tensor:
        """A scaled Bernoulli mask for the hidden layer, as nn.Dropout(p) would draw it (p=0: keep everything)."""
        if p == 0.0:
            return torch.ones(batch_size, self.hidden_units, device=like.device, dtype=like.dtype)
        keep = torch.empty(batch_size, self.hidden_units, device=like.device, dtype=like.dtype).bernoulli_(1 - p)
        return keep.div_(1 - p)

    def forward(self, x: torch.Tensor, dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.bn1(self.conv1(x)), 2))
        x = F.relu(F.max_pool2d(self.bn2(self.conv2(x)), 2))
        h = self.fc1(x.flatten(1))
        if self.training:
            mask = dropout_mask if dropout_mask is not None else self.dropout_mask(h.shape[0], h)
            h = h * mask.to(h.dtype)
        return self.fc2(F.relu(h))


def build_model(hidden_units: int = ARTICLE_HIDDEN) -> ArticleCNN:
    return ArticleCNN(hidden_units)


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


def weight_average(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of the weights and BatchNorm statistics (VAT_EMA_DECAY), evaluated and shipped
    in place of the last weights. Its decay warms up as min(decay, (1 + n) / (10 + n)) after n averaged updates, so
    the random initial weights are forgotten within the first updates (a fixed 0.999 would keep 5 % of them after
    the article's 3,000 updates, 0.25 % after the default 6,000). Integer buffers (BatchNorm's batch counter) are
    copied."""

    @torch.no_grad()
    def average(ema: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        if not torch.is_floating_point(ema[0]):
            torch._foreach_copy_(ema, current)
            return
        keep = torch.clamp((1 + n) / (10 + n), max=decay).to(ema[0].dtype)
        torch._foreach_lerp_(ema, current, 1 - keep)

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=average, use_buffers=True)


class DigitClassifier(nn.Module):
    """The model as it ships for use without this package: MNIST-style uint8 images [N, 28, 28] (white digit on
    black) in, logits [N, 10] out; the scaling to [0, 1] is inside."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.unsqueeze(1).float() / 255.0)


def exported(model: nn.Module) -> torch.export.ExportedProgram:
    """A self-contained program of `model` in eval mode (torch.export: loads with torch alone), any batch size."""
    classifier = DigitClassifier(copy.deepcopy(model).cpu()).eval()
    example = torch.zeros(2, 28, 28, dtype=torch.uint8)
    return torch.export.export(classifier, (example,), dynamic_shapes=({0: torch.export.Dim("batch", max=65536)},))
