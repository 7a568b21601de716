"""The repair workflow: search the valid triggers, retrain a copy against
them, measure before and after (DESIGN.md section 1, "Defense").

`gdm-ray defend`, the sweep's trials and bench/defense all repair through
:func:`repair`, so their figures agree by construction. One generator
``rng`` drives the search and then the retraining, in that order; every
held-out measurement draws its trigger placements from a fresh generator
seeded ``eval_seed`` (``seed + EVAL_SEED_OFFSET`` by convention), so the
before and after figures are measured on the same placements.
Pure PyTorch: no files, no Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gdm_ray.core.baseline import BaselineConfig, BaselineResult, PixelBaseline
from gdm_ray.core.data import ImageSet
from gdm_ray.core.defense import DefenseConfig, TriggerSampler, retrain
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.mesa import MESA, MESAConfig, MESAResult
from gdm_ray.core.metrics import attack_success_rate, clean_accuracy, sampled_asr
from gdm_ray.core.model_io import clone_model
from gdm_ray.core.triggers import Trigger

__all__ = ["METHODS", "Progress", "ProgressFactory", "SearchSpec", "SearchResult", "Measurement", "RepairResult",
           "search_triggers", "measure", "repair"]  # fmt: skip

METHODS = ("mesa", "baseline")
Progress = Callable[[int, int, float], None]
# desc -> (callback or None, close): what gdm_ray.cli.common.progress_bar gives for one phase
ProgressFactory = Callable[[str], tuple[Progress | None, Callable[[], None]]]


@dataclass
class SearchSpec:
    """One trigger search: ``method`` for ``target_class`` with its config.
    ``preview_samples`` > 0 draws that many triggers per MESA level from the
    search's generator after the fit (the pictures of search/defend)."""

    method: str
    target_class: int
    config: MESAConfig | BaselineConfig
    preview_samples: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} must be one of {', '.join(METHODS)}")
        want = MESAConfig if self.method == "mesa" else BaselineConfig
        if not isinstance(self.config, want):
            raise ConfigError(f"method={self.method} needs a {want.__name__}, got {type(self.config).__name__}")


@dataclass
class SearchResult:
    """What a search found: the sampler the defense draws from, and its record."""

    method: str
    target: int
    sampler: TriggerSampler  # the fitted MESA or PixelBaseline
    result: MESAResult | BaselineResult
    seconds: float
    previews: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per MESA level: (pattern, alpha)

    def summary(self) -> dict[str, Any]:
        """The search's figures as search.json (and defend's metrics "search") write them."""
        r = self.result
        if isinstance(r, MESAResult):
            out: dict[str, Any] = {"method": "mesa", "levels": r.generators.levels, "betas": r.betas, "alpha": r.alpha,
                                   "level_asr": r.asr, "entropy": r.entropy, "weights": r.weights, "steps": r.steps}  # fmt: skip
        else:
            out = {"method": "baseline", "found_asr_search": r.asr, "restart_asr": r.restart_asr}
        out.update({"search_seconds": round(self.seconds, 2), "target_class": self.target})
        return out


def _phase(progress: ProgressFactory | None, desc: str) -> tuple[Progress | None, Callable[[], None]]:
    return (None, lambda: None) if progress is None else progress(desc)


def search_triggers(
    method: str,
    model: nn.Module,
    data: ImageSet,
    target_class: int,
    config: MESAConfig | BaselineConfig,
    rng: torch.Generator,
    progress: ProgressFactory | None = None,
    preview_samples: int = 0,
) -> SearchResult:
    """MESA or the pixel baseline for ``target_class`` on ``data`` (clean images)."""
    spec = SearchSpec(method, int(target_class), config, preview_samples)
    update, close = _phase(progress, f"{method} search")
    t0 = time.perf_counter()
    try:
        if method == "mesa":
            sampler: Any = MESA(config)  # type: ignore[arg-type]
        else:
            sampler = PixelBaseline(config)  # type: ignore[arg-type]
        result = sampler.fit(model, data, spec.target_class, rng, update)
    finally:
        close()
    seconds = time.perf_counter() - t0
    previews = []
    if method == "mesa" and preview_samples > 0:  # drawn from rng before the retraining, as defend always did
        previews = [sampler.sample(preview_samples, generator=rng, level=i) for i in range(result.generators.levels)]
    return SearchResult(method, spec.target_class, sampler, result, seconds, previews)


@dataclass
class Measurement:
    """Held-out figures of one model: ``asr`` is the real trigger's (None when unknown)."""

    clean_accuracy: float
    asr: float | None
    found_asr_by_class: dict[int, float]

    @property
    def found_asr(self) -> float | None:
        v = self.found_asr_by_class
        return sum(v.values()) / len(v) if v else None

    def as_dict(self) -> dict[str, Any]:
        return {"clean_accuracy": self.clean_accuracy, "asr": self.asr,
                "found_asr_by_class": {str(k): a for k, a in self.found_asr_by_class.items()}, "found_asr": self.found_asr}  # fmt: skip


def measure(
    model: nn.Module,
    held_out: ImageSet,
    samplers: dict[int, TriggerSampler],
    eval_seed: int,
    real_trigger: Trigger | None = None,
    real_target: int | None = None,
) -> Measurement:
    """Clean accuracy, the real trigger's ASR and each found distribution's ASR;
    each ASR on placements from a fresh generator seeded ``eval_seed``."""
    acc = clean_accuracy(model, held_out)
    asr = None
    if real_trigger is not None and real_target is not None:
        asr = attack_success_rate(model, held_out, real_trigger, real_target, torch.Generator().manual_seed(eval_seed))
    found = {int(k): sampled_asr(model, held_out, s, int(k), torch.Generator().manual_seed(eval_seed)) for k, s in samplers.items()}
    return Measurement(acc, asr, found)


@dataclass
class RepairResult:
    """A repair: what was found, the repaired copy and the figures around it.
    ``repaired`` and ``after`` are None when there was nothing to repair."""

    targets: list[int]
    samplers: dict[int, TriggerSampler]
    search: SearchResult | None  # None when the samplers were handed in (a scan found them)
    before: Measurement
    after: Measurement | None
    repaired: nn.Module | None
    search_seconds: float
    retrain_seconds: float
    losses: list[float] = field(default_factory=list)


def repair(
    model: nn.Module,
    data: ImageSet,
    held_out: ImageSet,
    defense: DefenseConfig,
    rng: torch.Generator,
    eval_seed: int,
    *,
    search: SearchSpec | None = None,
    samplers: dict[int, TriggerSampler] | None = None,
    real_trigger: Trigger | None = None,
    real_target: int | None = None,
    progress: ProgressFactory | None = None,
    search_seconds: float = 0.0,
) -> RepairResult:
    """Search (``search``) or take found ``samplers`` (class -> sampler, most
    anomalous first), retrain a copy of ``model`` on ``data`` against all of
    them, and measure both on ``held_out``. ``model`` is left untouched.
    ``search_seconds`` records how long the handed-in samplers took to find."""
    if (search is None) == (samplers is None):
        raise ConfigError("repair needs exactly one of search= (a SearchSpec) or samplers= (found triggers)")
    found = None
    if search is not None:
        found = search_triggers(search.method, model, data, search.target_class, search.config, rng, progress,
                                search.preview_samples)  # fmt: skip
        samplers, search_seconds = {found.target: found.sampler}, found.seconds
    assert samplers is not None
    before = measure(model, held_out, samplers, eval_seed, real_trigger, real_target)
    if not samplers:  # a scan that flagged no class: nothing to repair
        return RepairResult([], {}, found, before, None, None, search_seconds, 0.0)
    repaired = clone_model(model)
    update, close = _phase(progress, "retrain")
    t0 = time.perf_counter()
    try:
        losses = retrain(repaired, data, list(samplers.values()), defense, rng, update)
    finally:
        close()
    retrain_seconds = time.perf_counter() - t0
    after = measure(repaired, held_out, samplers, eval_seed, real_trigger, real_target)
    return RepairResult(list(samplers), dict(samplers), found, before, after, repaired, search_seconds, retrain_seconds, losses)
