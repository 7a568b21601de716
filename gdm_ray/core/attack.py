"""BadNets-style data poisoning (Gu, Dolan-Gavitt, Garg, "BadNets:
Identifying Vulnerabilities in the Machine Learning Model Supply Chain", 2017).

With probability ``rate`` a training image gets the trigger applied and its
label replaced by ``target``; the rest train normally:
``Loss = sum L(P(Apply(m, x)), c) w.p. r, L(P(m), y) w.p. 1 - r``.
Poisoning happens per batch, so a random-location trigger lands somewhere
new every epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gdm_ray.core.data import ImageSet
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.metrics import attack_success_rate, clean_accuracy
from gdm_ray.core.train import TrainConfig, train_classifier
from gdm_ray.core.triggers import Trigger

__all__ = ["BadNets", "AttackResult"]


@dataclass
class AttackResult:
    clean_accuracy: float
    asr: float
    train_seconds: float
    losses: list[float]


class BadNets:
    """Poison a classifier so that ``trigger`` sends any image to ``target``.

    Args:
        trigger: the concrete trigger to implant.
        target: the target class c.
        rate: poisoning rate r in [0, 1] (the paper's 0.1 by default); 0 trains
            a clean model the same way, the reference a backdoor is judged against.

    Example:
        >>> attack = BadNets(trigger, target=3, rate=0.1)
        >>> result = attack.fit(model, splits.train, splits.eval, TrainConfig(epochs=5), torch.Generator().manual_seed(0))
    """

    def __init__(self, trigger: Trigger, target: int, rate: float = 0.1) -> None:
        if not 0.0 <= float(rate) <= 1.0:
            raise ConfigError(f"attack.rate={rate} must be in [0, 1]")
        if int(target) < 0:
            raise ConfigError(f"attack.target_class={target} must be >= 0")
        self.trigger = trigger
        self.target = int(target)
        self.rate = float(rate)

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the trigger to a Bernoulli(rate) share of the batch and relabel it."""
        mask = torch.rand(len(x), generator=rng) < self.rate
        if not bool(mask.any()):
            return x, y
        idx = mask.nonzero().squeeze(1).to(x.device)
        x = x.clone()
        y = y.clone()
        x[idx] = self.trigger.apply(x[idx], rng)
        y[idx] = self.target
        return x, y

    def fit(
        self,
        model: nn.Module,
        train: ImageSet,
        eval_set: ImageSet,
        cfg: TrainConfig,
        rng: torch.Generator,
        progress: Callable[[int, int, float], None] | None = None,
    ) -> AttackResult:
        """Train (from scratch or fine-tune: whatever state ``model`` is in) on poisoned data."""
        if self.target >= train.num_classes:
            raise ConfigError(
                f"attack.target_class={self.target} but the data has {train.num_classes} classes (0..{train.num_classes - 1})"
            )
        t0 = time.perf_counter()
        hook = self.poison_batch if self.rate > 0 else None
        losses = train_classifier(model, train, cfg, rng, hook, progress)
        seconds = time.perf_counter() - t0
        eval_g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
        return AttackResult(
            clean_accuracy=clean_accuracy(model, eval_set),
            asr=attack_success_rate(model, eval_set, self.trigger, self.target, eval_g),
            train_seconds=seconds,
            losses=losses,
        )
