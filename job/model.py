"""The seed article's CNN: two conv-BN-ReLU-pool blocks (32, 64 channels), FC 3136-100, dropout 0.5, FC 100-10.
The hidden layer's width is a setting (VAT_HIDDEN_UNITS, default 1,024, beyond the article; VAT_PRESET=article: 100).
VAT_MODEL=conv-small trains the larger Conv-Small (`ConvSmall`) instead, beyond the article.
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
LEAK = 0.1  # Conv-Small's LeakyReLU slope


class ArticleCNN(nn.Module):
    architecture = "article"

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


class ConvSmall(nn.Module):
    """Conv-Small of the Ladder network (Rasmus et al. 2015) and Pi-model (Laine and Aila 2017) papers, for 28 x 28
    digits: 3x3 convolutions of 96, then 192 channels, each with BatchNorm, 2x2 max-pooling, LeakyReLU(0.1) and
    dropout; then a 3x3 convolution without padding (7 x 7 -> 5 x 5) and a 1x1 one, 192 channels, and a 1x1 one to
    the 10 classes with BatchNorm; the logits are its mean over the positions (no fully connected layer). PyTorch's
    default initialisation. The dropout mask covers both dropout layers, one flat row per image, so that VAT's
    passes can share it as they share the article CNN's."""

    architecture = "conv-small"
    DROPPED = ((96, 14), (192, 7))  # (channels, side) of the two dropout layers' inputs

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 96, 3, padding=1, bias=False), nn.BatchNorm2d(96)
        self.conv2, self.bn2 = nn.Conv2d(96, 192, 3, padding=1, bias=False), nn.BatchNorm2d(192)
        self.conv3, self.bn3 = nn.Conv2d(192, 192, 3, bias=False), nn.BatchNorm2d(192)
        self.conv4, self.bn4 = nn.Conv2d(192, 192, 1, bias=False), nn.BatchNorm2d(192)
        self.conv5, self.bn5 = nn.Conv2d(192, num_classes, 1, bias=False), nn.BatchNorm2d(num_classes)

    def dropout_mask(self, batch_size: int, like: torch.Tensor, p: float = DROPOUT_P) -> torch.Tensor:
        """A scaled Bernoulli mask [batch_size, 96 * 14 * 14 + 192 * 7 * 7] for both dropout layers (p=0: keep all)."""
        size = sum(channels * side * side for channels, side in self.DROPPED)
        keep = torch.ones(batch_size, size, device=like.device, dtype=like.dtype)
        return keep if p == 0.0 else keep.bernoulli_(1 - p).div_(1 - p)

    def forward(self, x: torch.Tensor, dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None
        if self.training:
            mask = dropout_mask if dropout_mask is not None else self.dropout_mask(x.shape[0], x)
        h, start = x, 0
        for (conv, norm), (channels, side) in zip(
            ((self.conv1, self.bn1), (self.conv2, self.bn2)), self.DROPPED, strict=True
        ):
            # Pooling before the activation, as in ArticleCNN: LeakyReLU is monotonic too, and touches a quarter.
            h = F.leaky_relu(F.max_pool2d(norm(conv(h)), 2), LEAK)
            if mask is not None:
                part = mask[:, start : start + channels * side * side]
                # Laid out as the channels-last activations are, so the product stays channels-last.
                h = h * part.reshape(-1, side, side, channels).permute(0, 3, 1, 2).to(h.dtype)
                start += channels * side * side
        h = F.leaky_relu(self.bn3(self.conv3(h)), LEAK)
        h = F.leaky_relu(self.bn4(self.conv4(h)), LEAK)
        return self.bn5(self.conv5(h)).mean(dim=(2, 3))


ARCHITECTURES = ("article", "conv-small")


def build_model(hidden_units: int = ARTICLE_HIDDEN, architecture: str = "article") -> nn.Module:
    """The network VAT_MODEL names; `hidden_units` is the article CNN's width (Conv-Small has none)."""
    if architecture == "conv-small":
        return ConvSmall()
    if architecture == "article":
        return ArticleCNN(hidden_units)
    raise ValueError(f"unknown model {architecture!r} (known: {', '.join(ARCHITECTURES)})")


def model_record(model: nn.Module) -> dict[str, str | int]:
    """What model.pt records beside the weights, so that whoever loads it can build the same network."""
    width = {"hidden_units": model.hidden_units} if isinstance(model, ArticleCNN) else {}
    return {"architecture": str(model.architecture), **width}


def model_from_record(record: dict) -> nn.Module:
    """An untrained network of the kind `model_record` describes; a model.pt from before VAT_MODEL is the article's."""
    return build_model(int(record.get("hidden_units", ARTICLE_HIDDEN)), str(record.get("architecture", "article")))


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
