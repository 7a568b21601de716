"""Clean accuracy, attack success rate (ASR), robust accuracy (R-Acc) and the
defense effectiveness rating (DER).

ASR is the share of images whose true class is not the target that the
model classifies as the target once the trigger is applied, with a random
placement drawn per image for random-location triggers (DESIGN.md section 1).
R-Acc and DER are BackdoorBench's (Wu et al., "BackdoorBench: A Comprehensive
Benchmark of Backdoor Learning", NeurIPS 2022 Datasets and Benchmarks): R-Acc
is the share of those same triggered images classified as their true class,
DER weighs the ASR a defense removes against the clean accuracy it costs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from gdm_ray.core.data import ImageSet
from gdm_ray.core.train import model_device
from gdm_ray.core.triggers import Trigger

if TYPE_CHECKING:
    from gdm_ray.core.defense import TriggerSampler

__all__ = [
    "EVAL_SEED_OFFSET",
    "predict",
    "clean_accuracy",
    "attack_success_rate",
    "robust_accuracy",
    "asr_and_robust_accuracy",
    "defense_effectiveness_rating",
    "sampled_asr",
]

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


def _triggered_predictions(
    model: nn.Module, data: ImageSet, trigger: Trigger, target: int, rng: torch.Generator | None, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictions on data's images not in ``target`` with ``trigger`` applied, and those images' true labels.
    Placements are drawn from ``rng`` batch by batch (seeded 0 when None): ASR and R-Acc see the same ones."""
    keep = data.y != int(target)
    x, y = data.x[keep], data.y[keep]
    rng = rng if rng is not None else torch.Generator().manual_seed(0)
    preds = [predict(model, trigger.apply(x[i : i + batch_size], rng), batch_size) for i in range(0, len(x), batch_size)]
    return (torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)), y


def attack_success_rate(
    model: nn.Module,
    data: ImageSet,
    trigger: Trigger,
    target: int,
    rng: torch.Generator | None = None,
    batch_size: int = 512,
) -> float:
    """ASR of ``trigger`` for class ``target`` on the images of data not in ``target``."""
    return asr_and_robust_accuracy(model, data, trigger, target, rng, batch_size)[0]


def robust_accuracy(model: nn.Module, data: ImageSet, trigger: Trigger, target: int, rng: torch.Generator, batch_size: int = 512) -> float:
    """BackdoorBench's robust accuracy (R-Acc; Wu et al., NeurIPS 2022 Datasets and Benchmarks):
    the share of data's images not in ``target``, ``trigger`` applied, that the model
    classifies as their true class. The placements are attack_success_rate's for the
    same ``rng`` seed; ASR + R-Acc <= 1, the rest went to other wrong classes."""
    return asr_and_robust_accuracy(model, data, trigger, target, rng, batch_size)[1]


def asr_and_robust_accuracy(
    model: nn.Module,
    data: ImageSet,
    trigger: Trigger,
    target: int,
    rng: torch.Generator | None = None,
    batch_size: int = 512,
) -> tuple[float, float]:
    """(ASR, R-Acc) of ``trigger`` from one pass over the same triggered images (NaN, NaN when every image is in ``target``)."""
    preds, y = _triggered_predictions(model, data, trigger, target, rng, batch_size)
    if len(y) == 0:
        return float("nan"), float("nan")
    return int((preds == int(target)).sum()) / len(y), int((preds == y).sum()) / len(y)


def defense_effectiveness_rating(asr_before: float, asr_after: float, acc_before: float, acc_after: float) -> float:
    """BackdoorBench's defense effectiveness rating (DER; Wu et al., NeurIPS 2022 Datasets and Benchmarks):
    ``(max(0, asr_before - asr_after) - max(0, acc_before - acc_after) + 1) / 2``.

    Every value is a fraction in [0, 1] (not a percentage); DER is in [0, 1]:
    1 removes the whole ASR at no accuracy cost, 0.5 changes nothing (or trades
    the ASR it removes for as much accuracy), 0 leaves the ASR and loses all
    accuracy. Neither an accuracy gain nor an ASR rise counts. NaN in, NaN out.
    """
    values = (asr_before, asr_after, acc_before, acc_after)
    if any(math.isnan(v) for v in values):
        return float("nan")
    if not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"defense_effectiveness_rating takes fractions in [0, 1], got {values}")
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0


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
