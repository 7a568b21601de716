"""Choose a repair's stopping epoch on clean images it does not train on.

A repair is judged on two things the defender can measure without the real
trigger: clean accuracy, and how often the *found* triggers still flip images
to their class. With ``defense.holdout`` > 0 a share of the defender's clean
set is kept out of the retraining; after every epoch the retrained copy is
scored on it, ``clean accuracy - found-trigger ASR`` (the worst flagged
class's; accuracy alone for plain fine-tuning), and the best epoch's weights
are kept. That stops a schedule that has started to cost accuracy on a model
the project did not train, without knowing the model's own recipe. The
choice and every epoch's figures go into the repair's metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from gdm_ray.core.data import ImageSet
from gdm_ray.core.defense import TriggerSampler
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.metrics import clean_accuracy, sampled_asr

__all__ = ["holdout_split", "EpochPicker"]


def holdout_split(clean: ImageSet, share: float, rng: torch.Generator) -> tuple[ImageSet, ImageSet]:
    """(retraining images, held-out images): ``share`` of ``clean`` drawn at random."""
    n = len(clean)
    k = int(round(n * float(share)))
    if k < 1 or k >= n:
        raise ConfigError(f"defense.holdout={share} keeps {k} of {n} clean images out: it must leave at least one on each side")
    order = torch.randperm(n, generator=rng)
    return clean.subset(order[k:]), clean.subset(order[:k])


@dataclass
class EpochPicker:
    """Scores ``model`` on ``holdout`` after each epoch and keeps the best weights.

    The found triggers are placed by a generator seeded ``seed`` each time, so
    every epoch is scored on the same draws."""

    model: nn.Module
    holdout: ImageSet
    samplers: dict[int, TriggerSampler]
    seed: int
    epochs: list[dict] = field(default_factory=list)
    chosen_epoch: int | None = None
    _best: list[torch.Tensor] | None = None

    def __call__(self) -> None:
        """Called at the end of every epoch of the retraining."""
        # predict() puts the whole model back in train mode afterwards, which would undo
        # defense.batchnorm=frozen: every submodule's own mode is restored here
        modes = [m.training for m in self.model.modules()]
        try:
            acc = clean_accuracy(self.model, self.holdout)
            draws = lambda: torch.Generator().manual_seed(self.seed)  # noqa: E731
            found = {k: sampled_asr(self.model, self.holdout, s, k, draws()) for k, s in self.samplers.items()}
        finally:
            for m, mode in zip(self.model.modules(), modes):
                m.training = mode
        worst = max(found.values(), default=0.0)
        score = acc - (0.0 if math.isnan(worst) else worst)
        self.epochs.append({"epoch": len(self.epochs) + 1, "clean_accuracy": acc, "found_asr": worst, "score": score})
        best = max(e["score"] for e in self.epochs)
        if score >= best:  # ties go to the later epoch: more of the schedule run
            self.chosen_epoch = len(self.epochs)
            self._best = [t.detach().clone() for t in self.model.state_dict().values()]

    def restore(self) -> None:
        """Put the best epoch's weights (and BatchNorm statistics) back into the model."""
        if self._best is None:
            return
        with torch.no_grad():
            for t, saved in zip(self.model.state_dict().values(), self._best):
                t.copy_(saved)

    def summary(self) -> dict:
        """What metrics.json records of the choice."""
        return {"holdout_images": len(self.holdout), "chosen_epoch": self.chosen_epoch, "epochs": self.epochs}
