"""Clean accuracy and attack success rate (ASR).

ASR is the share of images whose true class is not the target that the
model classifies as the target once the trigger is applied, with a random
placement drawn per image for random-location triggers (DESIGN.md section 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from gdm_ray.core.data import ImageSet
from gdm_ray.core.train import model_device
from gdm_ray.core.triggers import Trigger

if TYPE_CHECKING:
    from gdm_ray.core.defense import TriggerSampler

__all__ = ["EVAL_SEED_OFFSET", "predict", "clean_accuracy", "attack_success_rate", "sampled_asr"]

# Held-out metrics draw trigger placements from seed + this offset, a stream apart from the
# search's and retraining's (seed itself): defend, sweep and the benches measure on the same placements.
EVAL_SEED_OFFSET = 7919


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted classes for x, in eval mode (the model's mode is restored)."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        out = [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def clean_accuracy(model: nn.Module, data: ImageSet, batch_size: int = 512) -> float:
    if len(data) == 0:
        return float("nan")
    return float((predict(model, data.x, batch_size) == data.y).float().mean())


def attack_success_rate(
    model: nn.Module,
    data: ImageSet,
    trigger: Trigger,
    target: int,
    rng: torch.Generator | None = None,
    batch_size: int = 512,
) -> float:
    """ASR of ``trigger`` for class ``target`` on the images of data not in ``target``."""
    keep = data.y != int(target)
    if not bool(keep.any()):
        return float("nan")
    x = data.x[keep]
    rng = rng if rng is not None else torch.Generator().manual_seed(0)
    hits = 0
    for i in range(0, len(x), batch_size):
        xb = trigger.apply(x[i : i + batch_size], rng)
        hits += int((predict(model, xb, batch_size) == int(target)).sum())
    return hits / len(x)


def sampled_asr(
    model: nn.Module,
    data: ImageSet,
    sampler: TriggerSampler,
    target: int,
    rng: torch.Generator,
    batch_size: int = 512,
) -> float:
    """ASR of a trigger *distribution*: each non-target image gets a fresh
    sample, at a random place (or the sampler's fixed ``position``), and
    counts if the model says ``target``."""
    from gdm_ray.core.triggers import apply_trigger, place

    keep = data.y != int(target)
    if not bool(keep.any()):
        return float("nan")
    x = data.x[keep]
    hits = 0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        pattern, mask = sampler.sample(len(xb), rng=rng)
        pos = place(len(xb), tuple(mask.shape[-2:]), tuple(xb.shape[2:]), getattr(sampler, "position", None), rng)
        triggered = apply_trigger(xb, pattern.to(xb.device), mask.to(xb.device), pos)
        hits += int((predict(model, triggered, batch_size) == int(target)).sum())
    return hits / len(x)
