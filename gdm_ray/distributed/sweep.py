"""Ray Tune sweeps of MESA and the defense (``gdm-ray sweep``).

A sweep's search space maps dotted config keys (``mesa.alpha``,
``mesa.trigger_size``, ``mesa.levels``, ``mesa.betas``, any ``mesa.`` or
``defense.`` field) to one spec each: ``{grid: [...]}``, ``{choice: [...]}``,
``{uniform: [low, high]}`` or ``{loguniform: [low, high]}``. Every trial runs
MESA for the target class on the defender's clean split with the trial's
settings, retrains a copy of the model against the found triggers, and scores
the defense on the held-out split (:func:`evaluate_trial`).

Trials are Ray Tune trials with the resources of ``RayConfig`` (task_cpus,
task_gpus, custom resources); the model file's bytes and the two data splits
reach them through Ray's object store (``tune.with_parameters``), so no
shared file system is needed. The experiment lives under the storage path;
:func:`run_tune` restores an interrupted one with ``Tuner.restore``
(finished trials are kept, unfinished and crashed ones run again).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import time
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from gdm_ray.core.data import ImageSet
from gdm_ray.core.errors import ConfigError, GdmRayError
from gdm_ray.core.metrics import EVAL_SEED_OFFSET
from gdm_ray.core.weights import LoadOptions
from gdm_ray.distributed.runtime import RayConfig, pin_threads

__all__ = [
    "SweepConfig",
    "SpaceParam",
    "TrialContext",
    "TrialRecord",
    "SPEC_KINDS",
    "MODES",
    "METRICS",
    "parse_space",
    "combinations",
    "apply_params",
    "param_fields",
    "evaluate_trial",
    "run_trial",
    "run_tune",
    "can_restore",
]

SPEC_KINDS = ("grid", "choice", "uniform", "loguniform")
MODES = ("grid", "random")
METRICS = ("objective", "asr_after", "acc_drop", "found_asr_after")  # all minimised
MAX_GRID = 10_000  # a grid larger than this is surely a typo
EXPERIMENT = "tune"  # the Tune experiment's folder under the storage path


@dataclass
class SweepConfig:
    """The ``sweep`` node of configs/sweep.yaml."""

    mode: str = "grid"
    num_samples: int = 1
    metric: str = "objective"
    max_concurrent: int | None = None
    space: Any = None  # Any, not dict | None: Hydra cannot merge a dict override into a typed null node
    default_space: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"sweep.mode={self.mode!r} must be one of {', '.join(MODES)}")
        if int(self.num_samples) < 1:
            raise ConfigError(f"sweep.num_samples={self.num_samples} must be >= 1")
        if self.mode == "grid" and int(self.num_samples) != 1:
            raise ConfigError(
                f"sweep.num_samples={self.num_samples} with sweep.mode=grid would repeat identical trials "
                "(every trial is seeded from seed=); use sweep.mode=random"
            )
        if self.metric not in METRICS:
            raise ConfigError(f"sweep.metric={self.metric!r} must be one of {', '.join(METRICS)}")
        if self.max_concurrent is not None and int(self.max_concurrent) < 1:
            raise ConfigError(f"sweep.max_concurrent={self.max_concurrent} must be >= 1 (or null)")

    @property
    def search_space(self) -> dict:
        return self.default_space if self.space is None else self.space


@dataclass(frozen=True)
class SpaceParam:
    """One swept config key and its spec."""

    key: str  # dotted config path, e.g. "mesa.alpha"
    kind: str  # one of SPEC_KINDS
    values: tuple  # grid/choice: the options; uniform/loguniform: (low, high)

    @property
    def group(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.key.split(".", 1)[1]

    def candidates(self) -> list[Any]:
        """The values to validate before starting: every option, or both bounds (as lists, not tuples)."""
        return [_thaw(v) for v in self.values]

    def spec(self) -> dict[str, list[Any]]:
        """The spec as configs write it, e.g. {"grid": [0.01, 0.1]}."""
        return {self.kind: self.candidates()}

    def domain(self) -> Any:
        """The Tune search-space object."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search([_thaw(v) for v in self.values])
        if self.kind == "choice":
            return tune.choice([_thaw(v) for v in self.values])
        low, high = self.values
        return tune.uniform(low, high) if self.kind == "uniform" else tune.loguniform(low, high)


def _spec_text(spec: Any) -> str:
    return json.dumps(spec, default=str, separators=(",", ":")) if isinstance(spec, (dict, list)) else repr(spec)


def _field_kind(cls: type, name: str) -> str:
    """The config field's type, optional or not, as a name: 'float', 'int', 'list[int]', ..."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return f"list[{typing.get_args(hint)[0].__name__}]"
    return getattr(hint, "__name__", str(hint))


def parse_space(space: Mapping | None, mode: str, groups: Mapping[str, type]) -> list[SpaceParam]:
    """Check a search space and turn it into SpaceParams (sorted by key).

    ``space`` maps dotted keys (or nested dicts, ``{mesa: {alpha: spec}}``) to
    specs; a null spec drops a key. ``groups`` maps each sweepable config
    group to its dataclass (e.g. ``{"mesa": MESAConfig}``)."""
    flat = _flat_space(space)
    return [_param(key, flat[key], mode, groups) for key in sorted(flat)]


def _flat_space(space: Mapping | None) -> dict[str, Any]:
    """The space as {dotted key: spec}, null specs dropped; an empty space is an error."""
    if space is not None and not isinstance(space, Mapping):
        raise ConfigError(f"sweep.space={_spec_text(space)} must map config keys to specs, e.g. {{mesa.alpha: {{grid: [0.01, 0.1]}}}}")
    flat: dict[str, Any] = {}

    def walk(node: Mapping, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if "." not in key and isinstance(v, Mapping) and v and not set(v) & set(SPEC_KINDS):
                walk(v, f"{key}.")  # {mesa: {alpha: spec}}: a group's keys
            elif v is not None:
                flat[key] = v

    walk(dict(space or {}), "")
    if not flat:
        raise ConfigError("sweep.space is empty: name at least one key to sweep, e.g. 'sweep.space={mesa.alpha:{grid:[0.01,0.1]}}'")
    return flat


def _param(key: str, spec: Any, mode: str, groups: Mapping[str, type]) -> SpaceParam:
    """One key's spec checked against its config field: a SpaceParam."""
    group, _, name = key.partition(".")
    cls = groups.get(group)
    if cls is None or name not in {f.name for f in dataclasses.fields(cls)}:
        known = ", ".join(f"{g}.<field>" for g in groups)
        raise ConfigError(
            f"sweep.space: unknown key {key!r} (sweepable: {known}, e.g. mesa.alpha, mesa.trigger_size, mesa.levels, mesa.betas)"
        )
    where = f"sweep.space.{key}={_spec_text(spec)}"
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in SPEC_KINDS:
        raise ConfigError(
            f"{where}: a spec is one of {{grid: [...]}}, {{choice: [...]}}, {{uniform: [low, high]}}, {{loguniform: [low, high]}}"
        )
    kind, values = next(iter(spec.items()))
    if mode == "grid" and kind != "grid":
        raise ConfigError(f"{where}: sweep.mode=grid takes {{grid: [...]}} specs only (use sweep.mode=random for {kind})")
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{where}: {kind} needs a non-empty list")
    if kind in ("uniform", "loguniform"):
        if _field_kind(cls, name) != "float":
            raise ConfigError(f"{where}: {key} is not a float setting; use {{choice: [...]}} or {{grid: [...]}}")
        values = _bounds(where, kind, values)
    elif len({_spec_text(v) for v in values}) != len(values):
        raise ConfigError(f"{where}: {kind} lists a value twice")
    return SpaceParam(key, kind, tuple(_freeze(v) for v in values))


def _bounds(where: str, kind: str, values: list | tuple) -> list[float]:
    """[low, high] of a uniform or loguniform spec, checked."""
    ok = len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if not ok or not values[0] < values[1]:
        raise ConfigError(f"{where}: {kind} needs [low, high] with low < high")
    if kind == "loguniform" and values[0] <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0")
    return [float(v) for v in values]


def _freeze(v: Any) -> Any:
    return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


def _thaw(v: Any) -> Any:
    return [_thaw(x) for x in v] if isinstance(v, (list, tuple)) else v


def combinations(params: list[SpaceParam], mode: str) -> list[dict[str, Any]]:
    """The parameter settings to validate before starting: the whole grid in
    grid mode; in random mode each parameter's candidates one at a time (the
    others at their first candidate)."""
    if mode == "grid":
        total = math.prod(len(p.values) for p in params)
        if total > MAX_GRID:
            raise ConfigError(f"sweep.space: the grid has {total} trials (more than {MAX_GRID}); use sweep.mode=random")
        return [{p.key: _thaw(v) for p, v in zip(params, combo)} for combo in itertools.product(*(p.values for p in params))]
    first = {p.key: _thaw(p.values[0]) for p in params}
    return [{**first, p.key: v} for p in params for v in p.candidates()]


def apply_params(base: Mapping[str, Mapping], params: Mapping[str, Any]) -> dict[str, dict]:
    """The per-group config dicts of one trial: ``base`` with the trial's values."""
    out = {g: dict(v) for g, v in base.items()}
    for key, value in params.items():
        group, _, name = key.partition(".")
        out[group][name] = _thaw(value)
    return out


def param_fields(params: list[SpaceParam], groups: Mapping[str, type]) -> list[pa.Field]:
    """One Parquet column per swept key, typed by its config field."""
    types = {
        "float": pa.float64(),
        "int": pa.int64(),
        "bool": pa.bool_(),
        "str": pa.string(),
        "list[int]": pa.list_(pa.int64()),
        "list[float]": pa.list_(pa.float64()),
    }
    return [pa.field(p.key, types.get(_field_kind(groups[p.group], p.name), pa.string())) for p in params]


# --- one trial ------------------------------------------------------------------------


@dataclass
class TrialContext:
    """Everything a trial needs; it reaches the trials through Ray's object store."""

    model_bytes: bytes  # the model file, so trials need no shared file system
    model_suffix: str
    options: LoadOptions | None  # how to read the model file (a state dict's architecture, key renames, normalisation)
    defense: ImageSet  # the defender's clean split: search and retraining
    eval: ImageSet  # the held-out split: every metric
    target: int
    real_trigger: dict  # TriggerSpec fields of the trigger the model was poisoned with
    real_target: int
    base: dict[str, dict]  # {"mesa": {...}, "defense": {...}} before the trial's values
    keys: list[str]  # the swept keys
    seed: int
    device: str  # auto | cpu | cuda[:k]
    cpus: float
    gpus: float
    keep_freed_memory: bool = True  # ray.keep_freed_memory: the trial's worker keeps freed tensor memory


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def evaluate_trial(params: Mapping[str, Any], ctx: TrialContext) -> dict[str, Any]:
    """One trial: the core repair workflow (search, retrain, measure) with the
    trial's settings; an input problem gives a row with ``error`` set and
    null metrics, not an exception."""
    import numpy as np
    import torch

    from gdm_ray.core.defense import DefenseConfig
    from gdm_ray.core.mesa import MESAConfig
    from gdm_ray.core.model_io import load_model_bytes
    from gdm_ray.core.repair import repair, search_triggers
    from gdm_ray.core.triggers import TriggerSpec, make_trigger
    from gdm_ray.store.provenance import code_version

    t0 = time.perf_counter()
    pin_threads(ctx.cpus, ctx.keep_freed_memory)
    random.seed(ctx.seed)
    np.random.seed(ctx.seed % 2**32)
    torch.manual_seed(ctx.seed)
    out: dict[str, Any] = {"error": "", "code_version": code_version(), "seed": ctx.seed}
    try:
        groups = apply_params(ctx.base, params)
        mesa_cfg, defense_cfg = MESAConfig(**groups["mesa"]), DefenseConfig(**groups["defense"])
        device = _trial_device(ctx)
        c, h, w = ctx.eval.shape
        model = load_model_bytes(
            ctx.model_bytes, f"model{ctx.model_suffix}", (c, h, w), ctx.eval.num_classes, None, device, ctx.options
        ).module
        real = make_trigger(TriggerSpec(**ctx.real_trigger), c, (h, w))
        rng = torch.Generator().manual_seed(ctx.seed)
        found = search_triggers("mesa", model, ctx.defense, ctx.target, mesa_cfg, None, rng)
        fixed = repair(
            model, ctx.defense, ctx.eval, {ctx.target: found.sampler}, defense_cfg, rng, ctx.seed + EVAL_SEED_OFFSET, real, ctx.real_target
        )
        before, after = fixed.before, fixed.after
        acc_drop = (before.clean_accuracy - after.clean_accuracy) * 100.0
        out.update(
            objective=after.asr + acc_drop / 100.0,
            asr_after=after.asr,
            acc_drop=acc_drop,
            found_asr_after=after.found_asr,
            asr_before=before.asr,
            acc_before=before.clean_accuracy,
            acc_after=after.clean_accuracy,
            found_asr_before=before.found_asr,
            search_seconds=found.seconds,
            retrain_seconds=fixed.retrain_seconds,
            device=str(device),
        )
    except GdmRayError as exc:
        out.update(error=_one_line(exc), objective=float("nan"))
    out["seconds"] = time.perf_counter() - t0
    return out


def _trial_device(ctx: TrialContext) -> Any:
    """auto: the GPU Ray gave the trial (ray.task_gpus > 0) when the node has one."""
    import torch

    dev = ctx.device
    if dev == "auto":
        dev = "cuda" if ctx.gpus > 0 and torch.cuda.is_available() else "cpu"
    return torch.device(dev)


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune trainable: one trial, one report."""
    from ray import tune

    tune.report(evaluate_trial({k: config[k] for k in ctx.keys}, ctx))


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


# --- the experiment ---------------------------------------------------------------------


@dataclass
class TrialRecord:
    """A finished (or failed) trial as Tune reports it."""

    trial_id: str
    params: dict[str, Any]
    metrics: dict[str, Any]  # what the trial reported ({} if it never did)
    error: str | None  # a crash after Tune's retries, or an input problem the trial reported
    finished: bool

    @property
    def index(self) -> int:
        tail = self.trial_id.rsplit("_", 1)[-1]
        return int(tail) if tail.isdigit() else 0


def _resources(cfg: RayConfig) -> Any:
    from ray.tune import PlacementGroupFactory

    bundle = {"CPU": float(cfg.task_cpus), "GPU": float(cfg.task_gpus)}
    bundle.update({str(k): float(v) for k, v in dict(cfg.resources).items()})
    return PlacementGroupFactory([bundle])


def can_restore(experiment: str | Path, filesystem: Any = None) -> bool:
    """Whether ``experiment`` (a local folder, or a path on ``filesystem``, a pyarrow
    filesystem such as S3) holds a Tune experiment to resume."""
    from ray.tune import Tuner

    if filesystem is not None:
        return Tuner.can_restore(str(experiment), storage_filesystem=filesystem)
    return Path(experiment).is_dir() and Tuner.can_restore(str(experiment))


def run_tune(
    experiment: str | Path,
    params: list[SpaceParam],
    sweep: SweepConfig,
    ctx: TrialContext,
    ray_cfg: RayConfig,
    verbose: int = 1,
    filesystem: Any = None,
) -> tuple[list[TrialRecord], bool]:
    """Run (or, when ``experiment`` holds one, restore and finish) the Tune
    experiment; Ray must be running. ``experiment`` is a local folder or, with
    ``filesystem`` (pyarrow's S3), ``bucket/prefix/name`` there: Tune then keeps
    its state on S3, and any machine can resume it. Returns the trials in
    order and whether the experiment was restored."""
    restored = can_restore(experiment, filesystem)
    grid = _tuner(experiment, restored, params, sweep, ctx, ray_cfg, verbose, filesystem).fit()
    records = [_record(result, params) for result in grid]
    records.sort(key=lambda r: (r.index, r.trial_id))
    return records, restored


def _tuner(
    experiment: str | Path,
    restored: bool,
    params: list[SpaceParam],
    sweep: SweepConfig,
    ctx: TrialContext,
    ray_cfg: RayConfig,
    verbose: int,
    filesystem: Any,
) -> Any:
    """The Tune experiment: restored from ``experiment``, or a new one there."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), _resources(ray_cfg))
    if restored:
        # finished trials keep their results; unfinished and crashed ones run again
        return tune.Tuner.restore(
            str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
        )
    parent, name = str(experiment).rstrip("/").rsplit("/", 1)
    return tune.Tuner(
        trainable,
        param_space={p.key: p.domain() for p in params},
        tune_config=tune.TuneConfig(
            num_samples=int(sweep.num_samples),
            search_alg=BasicVariantGenerator(random_state=ctx.seed),  # seeded random draws
            max_concurrent_trials=sweep.max_concurrent,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=parent,
            storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=int(ray_cfg.max_retries)),
            verbose=verbose,
        ),
    )


def _record(result: Any, params: list[SpaceParam]) -> TrialRecord:
    """One Tune result as a TrialRecord (a trial that never reported has no metrics)."""
    metrics = dict(result.metrics or {})
    crashed = _one_line(result.error) if result.error is not None else None
    reported = "objective" in metrics
    return TrialRecord(
        trial_id=str(metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_")),
        params={p.key: _thaw((result.config or {}).get(p.key)) for p in params},
        metrics=metrics if reported else {},
        error=crashed or (metrics.get("error") or None if reported else None),
        finished=reported or crashed is not None,
    )
