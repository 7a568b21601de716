"""The repair workflow: search the triggers, retrain against them, measure
before and after. One function for ``gdm-ray defend``, every sweep trial and
bench/defense.py, so the three cannot drift apart.

Three methods: ``mesa`` (retrain against the found distribution of triggers),
``baseline`` (against the one trigger pixel-space SGD finds) and ``finetune``
(the floor any repair must beat: plain fine-tuning on the same clean data with
the same DefenseConfig budget, no search and no triggers).

Random draws: one generator ``rng`` drives the search and then the
retraining (in that order; a caller that draws from it in between, such as
defend's sample pictures, does so between ``search_triggers`` and
``repair``). Every measurement draws from a fresh generator seeded
``eval_seed`` (the run's seed + ``metrics.EVAL_SEED_OFFSET``), so before and
after see the same trigger placements.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from gdm_ray.core.baseline import BaselineConfig, BaselineResult, PixelBaseline
from gdm_ray.core.data import ImageSet
from gdm_ray.core.defense import DefenseConfig, TriggerSampler, retrain
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.lr_probe import probe_lr
from gdm_ray.core.mesa import MESA, MESAConfig, MESAResult
from gdm_ray.core.metrics import asr_and_robust_accuracy, clean_accuracy, defense_effectiveness_rating, sampled_asr
from gdm_ray.core.model_io import clone_model
from gdm_ray.core.selection import EpochPicker, holdout_split
from gdm_ray.core.triggers import Trigger

__all__ = ["METHODS", "SEARCH_METHODS", "Search", "search_triggers", "Measurement", "measure", "RepairResult", "repair"]

METHODS = ("mesa", "baseline", "finetune")
SEARCH_METHODS = ("mesa", "baseline")  # the methods that search triggers (finetune has none)
Progress = Callable[[int, int, float], None]


@dataclass
class Search:
    """What a trigger search found for one class: the sampler a repair draws
    from, and the method's own result (MESA's staircase or the baseline's trigger).
    ``finetune`` searches nothing: its sampler is None."""

    method: str
    target_class: int
    sampler: TriggerSampler | None
    seconds: float
    mesa: MESAResult | None = None
    baseline: BaselineResult | None = None


def search_triggers(
    method: str,
    model: nn.Module,
    data: ImageSet,
    target_class: int,
    mesa_cfg: MESAConfig | None,
    baseline_cfg: BaselineConfig | None,
    rng: torch.Generator,
    progress: Progress | None = None,
) -> Search:
    """MESA (the distribution of valid triggers) or the baseline (one trigger) for ``target_class`` on ``data``;
    ``finetune`` returns at once with no sampler (and draws nothing from ``rng``)."""
    t0 = time.perf_counter()
    if method == "finetune":
        return Search(method, target_class, None, time.perf_counter() - t0)
    if method == "mesa":
        mesa = MESA(mesa_cfg)
        found = mesa.fit(model, data, target_class, rng, progress)
        return Search(method, target_class, mesa, time.perf_counter() - t0, mesa=found)
    if method == "baseline":
        base = PixelBaseline(baseline_cfg)
        trigger = base.fit(model, data, target_class, rng, progress)
        return Search(method, target_class, base, time.perf_counter() - t0, baseline=trigger)
    raise ConfigError(f"method={method!r} must be one of {', '.join(METHODS)}")


@dataclass
class Measurement:
    """A model on the held-out split: clean accuracy, the real trigger's ASR and
    robust accuracy (R-Acc: triggered non-target images classified as their true
    class; both None when the real trigger is not known) and the found triggers'
    ASR per class."""

    clean_accuracy: float
    asr: float | None
    found_asr_by_class: dict[int, float] = field(default_factory=dict)
    robust_accuracy: float | None = None

    @property
    def found_asr(self) -> float | None:
        v = list(self.found_asr_by_class.values())
        return sum(v) / len(v) if v else None

    def as_dict(self) -> dict:
        """As metrics.json writes it (class keys as strings)."""
        return {
            "clean_accuracy": self.clean_accuracy,
            "asr": self.asr,
            "robust_accuracy": self.robust_accuracy,
            "found_asr": self.found_asr,
            "found_asr_by_class": {str(k): v for k, v in self.found_asr_by_class.items()},
        }


def measure(
    model: nn.Module,
    data: ImageSet,
    samplers: dict[int, TriggerSampler],
    eval_seed: int,
    real: Trigger | None = None,
    real_target: int | None = None,
) -> Measurement:
    """``model`` on ``data``: every draw from a fresh generator seeded ``eval_seed``
    (the real trigger's ASR and R-Acc from one pass over the same placements)."""
    acc = clean_accuracy(model, data)
    asr = racc = None
    if real is not None and real_target is not None:
        asr, racc = asr_and_robust_accuracy(model, data, real, real_target, torch.Generator().manual_seed(eval_seed))
    found = {k: sampled_asr(model, data, s, k, torch.Generator().manual_seed(eval_seed)) for k, s in samplers.items()}
    return Measurement(acc, asr, found, racc)


@dataclass
class RepairResult:
    """A repair: the model before and after retraining against the found triggers
    (``targets`` empty for plain fine-tuning)."""

    targets: list[int]
    before: Measurement | None
    after: Measurement
    repaired: nn.Module
    retrain_seconds: float
    losses: list[float]
    selection: dict | None = None  # the held-out epoch choice (core/selection.py), when defense.holdout > 0
    lr_probe: dict | None = None  # the rates tried and the one used (core/lr_probe.py), when defense.lr_probe_steps > 0

    @property
    def der(self) -> float | None:
        """BackdoorBench's DER of the real trigger (metrics.defense_effectiveness_rating);
        None when its ASR is unknown or ``before`` was not measured."""
        b, a = self.before, self.after
        if b is None or b.asr is None or a.asr is None:
            return None
        return defense_effectiveness_rating(b.asr, a.asr, b.clean_accuracy, a.clean_accuracy)


def repair(
    model: nn.Module,
    clean: ImageSet,
    eval_data: ImageSet,
    samplers: dict[int, TriggerSampler],
    cfg: DefenseConfig,
    rng: torch.Generator,
    eval_seed: int,
    real: Trigger | None = None,
    real_target: int | None = None,
    progress: Progress | None = None,
    measure_before: bool = True,
    finetune: bool = False,
) -> RepairResult:
    """Measure ``model``, retrain a copy on ``clean`` against ``samplers`` (one
    per flagged class, most anomalous first; see ``defense.retrain``), measure
    the copy. ``model`` itself is left untouched.

    ``finetune=True``: the floor a repair must beat, plain fine-tuning of the
    copy on ``clean`` with ``cfg``'s budget and no triggers; ``samplers`` must
    then be empty (fine-tuning has nothing to repair against)."""
    if finetune and samplers:
        raise ConfigError(f"finetune retrains with no triggers: it takes no samplers (got classes {', '.join(map(str, samplers))})")
    if not samplers and not finetune:
        raise ConfigError("repair needs the found triggers of at least one class")
    before = measure(model, eval_data, samplers, eval_seed, real, real_target) if measure_before else None
    repaired = clone_model(model)
    t0 = time.perf_counter()
    picker = None
    if float(cfg.holdout) > 0:
        clean, held = holdout_split(clean, cfg.holdout, rng)
        picker = EpochPicker(repaired, held, samplers, eval_seed)
    probe = None
    if int(cfg.lr_probe_steps) > 0:
        probe = probe_lr(repaired, clean, list(samplers.values()), cfg, eval_seed)
        cfg = dataclasses.replace(cfg, lr=probe["lr"])
    losses = retrain(repaired, clean, list(samplers.values()), cfg, rng, progress, picker)
    if picker is not None:
        picker.restore()
    seconds = time.perf_counter() - t0
    after = measure(repaired, eval_data, samplers, eval_seed, real, real_target)
    selection = None if picker is None else picker.summary()
    return RepairResult(list(samplers), before, after, repaired, seconds, losses, selection, probe)
