"""Repair a backdoored model by retraining against sampled triggers.

The defender's clean images train the model again; with probability
``rate`` (the paper's r') an image gets a trigger sampled from the found
distribution applied at a random location while keeping its true label, so
the model unlearns "trigger => target" (DESIGN.md section 1, "Defense").
With MESA's ensemble this covers the whole distribution of valid triggers;
with the baseline's single trigger it is the "point defense".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from gdm_ray.core.data import ImageSet
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.train import TrainConfig, train_classifier
from gdm_ray.core.triggers import apply_trigger, place

__all__ = ["TriggerSampler", "DefenseConfig", "retrain"]


class TriggerSampler(Protocol):
    """What a defense needs from a finished search: n (pattern, alpha) samples."""

    def sample(
        self, n: int, generator: torch.Generator | None = None, level: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class DefenseConfig:
    """Retraining settings: ``rate`` is r', the share of images given a sampled trigger."""

    rate: float = 0.5
    epochs: float = 3
    batch_size: int = 128
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    crop_pad: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < float(self.rate) <= 1.0:
            raise ConfigError(f"defense.rate={self.rate} must be in (0, 1]")

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, optimizer=self.optimizer,
            momentum=self.momentum, weight_decay=self.weight_decay, schedule=self.schedule,
            crop_pad=self.crop_pad, flip=self.flip,
        )  # fmt: skip


def retrain(
    model: nn.Module,
    clean: ImageSet,
    samplers: list[TriggerSampler],
    cfg: DefenseConfig,
    generator: torch.Generator,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[float]:
    """Retrain ``model`` in place on ``clean`` with sampled triggers, true labels kept.

    Several samplers (one per flagged class) share the triggered images
    equally, so several backdoors are repaired at once. (Running ``epochs``
    per sampler, so each class is seen as often as in a one-target repair,
    was tried on bench/detect's fixed irregular trigger repaired beside two
    natural ones: its ASR after went from 7.7% to 16.9%, so it was dropped.)
    """
    if not samplers:
        raise ConfigError("retrain needs at least one trigger sampler")
    _, H, W = clean.shape

    def hook(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.rand(len(x), generator=g) < cfg.rate
        idx = mask.nonzero().squeeze(1)
        if len(idx) == 0:
            return x, y
        x = x.clone()
        which = torch.randint(0, len(samplers), (len(idx),), generator=g)
        for k, sampler in enumerate(samplers):
            sel = idx[which == k]
            if len(sel) == 0:
                continue
            pattern, alpha = sampler.sample(len(sel), generator=g)
            # a fixed-location trigger distribution keeps its place
            pos = place(len(sel), tuple(alpha.shape[-2:]), (H, W), getattr(sampler, "position", None), g)
            dev = x.device
            x[sel.to(dev)] = apply_trigger(x[sel.to(dev)], pattern.to(dev), alpha.to(dev), pos)
        return x, y  # labels stay true: the trigger must stop meaning "target"

    return train_classifier(model, clean, cfg.train_config(), generator, hook, progress)
