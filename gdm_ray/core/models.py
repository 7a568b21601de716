"""Classifier architectures: a small CNN (28x28 grey) and a ResNet-9-style net
(32x32 colour). Both take float images in [0, 1] of any C x H x W (pooling is
adaptive) and normalise inside the model, as the model contract requires.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gdm_ray.core.errors import ConfigError
from gdm_ray.core.standard_models import STANDARD_ARCHS

__all__ = ["Normalize", "SmallCNN", "ResNet9", "ARCHS", "build_model"]


class Normalize(nn.Module):
    """Per-channel (x - mean) / std, stored as buffers so it travels with the weights."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Without this check a grey batch would broadcast against 3-channel stats.
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"expected N x {self.mean.shape[1]} x H x W images, got {list(x.shape)}")
        return (x - self.mean) / self.std


def _conv_bn(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Two conv blocks and a two-layer head: ~92% on Fashion-MNIST in a few epochs."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.norm = Normalize([0.5] * in_channels, [0.5] * in_channels)
        self.features = nn.Sequential(_conv_bn(in_channels, width, pool=True), _conv_bn(width, 2 * width, pool=True))
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 49, hidden), nn.ReLU(inplace=True), nn.Dropout(0.25), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(self.norm(x))))


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """The ResNet-9 of fast CIFAR-10 training (prep, 3 stages, 2 residual
    blocks), width-scaled: width 16 trains an epoch of CIFAR-10 in under a
    minute on 2 CPU cores."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.norm = Normalize([0.5] * in_channels, [0.25] * in_channels)
        self.features = nn.Sequential(
            _conv_bn(in_channels, w),
            _conv_bn(w, 2 * w, pool=True),
            _Residual(2 * w),
            _conv_bn(2 * w, 4 * w, pool=True),
            _conv_bn(4 * w, 8 * w, pool=True),
            _Residual(8 * w),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A fixed logit scale (as in fast CIFAR ResNet-9 recipes) steadies training.
        return self.fc(self.features(self.norm(x))) * 0.125


ARCHS: dict[str, type[nn.Module]] = {"small_cnn": SmallCNN, "resnet9": ResNet9}


def build_model(arch: str, in_channels: int, num_classes: int, width: int | None = None) -> nn.Module:
    """A fresh model of a known architecture: gdm-ray's own or a standard one (gdm_ray.core.standard_models;
    ``width`` is PreAct-ResNet18's base width there, ignored by the others)."""
    if arch in STANDARD_ARCHS:
        if in_channels < 1 or num_classes < 2:
            raise ConfigError(f"model needs in_channels >= 1 and num_classes >= 2 (got {in_channels}, {num_classes})")
        extra = {"width": int(width)} if width is not None and arch == "preact_resnet18" else {}
        return STANDARD_ARCHS[arch](in_channels=in_channels, num_classes=num_classes, **extra)
    if arch not in ARCHS:
        raise ConfigError(f"arch={arch!r} is not one of {', '.join([*ARCHS, *STANDARD_ARCHS])}")
    if in_channels < 1 or num_classes < 2:
        raise ConfigError(f"model needs in_channels >= 1 and num_classes >= 2 (got {in_channels}, {num_classes})")
    kwargs = {} if width is None else {"width": int(width)}
    if width is not None and int(width) < 1:
        raise ConfigError(f"model.width={width} must be >= 1")
    return ARCHS[arch](in_channels=in_channels, num_classes=num_classes, **kwargs)
