"""The scan of one model or a zoo: a PLAN, then a RUN through an executor.

The plan fixes every seed before anything runs: the first-pass plan
(``plan_scan`` with ``torch.Generator().manual_seed(seed)``, the same for
every model, so a model's verdict does not depend on its neighbours) and the
seed base of the class searches, drawn from the same generator right after
(class k of any model searches with base + k). A model with clean examples
of its own (``examples``: TrojAI's ``clean-example-data/``) is searched and
judged on them instead of the shared data: its first pass is planned on them
from a generator seeded alike (the split ``gdm-ray scan`` would make of that
set), and its windows and MESA search them. The run is stages of jobs
(``gdm_ray.core.executor``): every (model, chunk of classes) of the first
pass; then the zoo reference (>= ``MIN_ZOO`` models, ``calibrate``) or a
given reference of other models' sizes; then, for each flagged class, every
chunk of its moving windows and its MESA search. Each job's answer follows
from the plan and the job alone, so the in-process and the Ray executor give
the same results by construction.

No printing, no files: the result is one ``ModelScan`` per model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from gdm_ray.core.class_search import ClassSearch, class_mesa, mesa_seed, window_seed
from gdm_ray.core.data import ImageSet
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.executor import Executor, JobResult, ModelBlob, ModelContext
from gdm_ray.core.first_pass import (
    ClassTrigger,
    ScanConfig,
    ScanPlan,
    ScanResult,
    plan_scan,
    reference_anomaly,
    rescore,
    scan_chunks,
    scan_result,
)
from gdm_ray.core.mesa import MESA, MESAConfig, MESAResult
from gdm_ray.core.moving_window import HeatMap, WindowFind, WindowPlan, plan_windows, search_windows, window_result

__all__ = [
    "MIN_ZOO",
    "ZooScanPlan",
    "ModelScan",
    "ZooScan",
    "ScanContext",
    "ResumeState",
    "Progress",
    "FirstPassJob",
    "WindowJob",
    "MesaJob",
    "plan_zoo_scan",
    "plan_model_scan",
    "run_zoo_scan",
    "first_pass_chunk",
    "window_chunk",
    "class_mesa_job",
    "search_base",
    "examples_digest",
]

# fewer models than this cannot say what a class's trigger size usually is
MIN_ZOO = 3

# a stage's name, jobs finished, jobs in all
Progress = Callable[[str, int, int], None]


def search_base(rng: torch.Generator) -> int:
    """The seed base of the class searches (class k: base + k): any order, any process."""
    return int(torch.randint(0, 2**62, (1,), generator=rng))


@dataclass(frozen=True)
class ZooScanPlan:
    """Every seed and setting of a scan, fixed before it runs."""

    models: list[str]  # model ids, in order
    scan: ScanConfig
    mesa: MESAConfig | None  # None: no MESA on flagged classes
    window: bool  # moving window on flagged classes
    first_pass: ScanPlan
    base: int  # class k of any model searches with base + k
    eval_seed: int  # seeds the held-out ASR of each MESA's samples
    calibrate: bool = True  # judge classes against the same class in the other models (>= MIN_ZOO)
    reference: list[list[float]] | None = None  # other models' per-class sizes (a finished zoo-scan)
    own: dict[str, ScanPlan] = field(default_factory=dict)  # model id -> its first pass on its own examples

    def class_seed(self, k: int) -> int:
        return self.base + int(k)

    def first_pass_of(self, model_id: str) -> ScanPlan:
        """The model's first-pass plan: on its own examples if it has them, else the shared one."""
        return self.own.get(model_id, self.first_pass)


def plan_zoo_scan(
    data: ImageSet,
    models: Sequence[str],
    cfg: ScanConfig,
    mesa: MESAConfig | None,
    seed: int,
    full_search: bool = True,
    calibrate: bool = True,
    reference: list[list[float]] | None = None,
    examples: Mapping[str, ImageSet] | None = None,
) -> ZooScanPlan:
    """Plan the scan of ``models`` on the defender's clean ``data``.
    ``scan.method=baseline`` is the first pass alone (no window, no MESA);
    ``full_search=False`` skips MESA; ``reference`` judges each model's classes
    against those sizes (one per other model, every class) instead of the zoo;
    ``examples``: model id -> that model's own clean images, used for it
    instead of ``data`` (the same classes)."""
    ids = list(models)
    if not ids:
        raise ConfigError("scan: no models to scan")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"scan: model ids {sorted({m for m in ids if ids.count(m) > 1})} appear twice")
    baseline = cfg.method == "baseline"
    rng = torch.Generator().manual_seed(int(seed))
    first = plan_scan(data, cfg, rng)
    base = search_base(rng)  # drawn right after the plan, as `gdm-ray scan` always has
    if reference is not None and any(len(r) != data.num_classes for r in reference):
        raise ConfigError(f"reference: every model needs sizes for all {data.num_classes} classes")
    own = {m: _own_plan(m, ids, data, x, cfg, seed) for m, x in (examples or {}).items()}
    return ZooScanPlan(
        ids,
        cfg,
        mesa if full_search and not baseline and mesa is not None else None,
        bool(cfg.moving_window) and not baseline,
        first,
        base,
        int(seed),
        calibrate,
        reference,
        own,
    )


def _own_plan(model_id: str, ids: list[str], data: ImageSet, own: ImageSet, cfg: ScanConfig, seed: int) -> ScanPlan:
    """The first pass of a model on its own examples, seeded as the shared one is."""
    if model_id not in ids:
        raise ConfigError(f"scan: examples for {model_id!r}, which is not a planned model")
    if own.classes != data.classes or own.shape != data.shape:
        raise ConfigError(
            f"scan: {model_id}'s examples are {own.shape} with {own.num_classes} classes, the data {data.shape} with {data.num_classes}"
        )
    return plan_scan(own, cfg, torch.Generator().manual_seed(int(seed)))


def examples_digest(data: ImageSet) -> str:
    """A fingerprint of a set of clean images (what a resumed first pass must have searched)."""
    h = hashlib.sha256(data.x.contiguous().numpy().tobytes())
    h.update(data.y.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def plan_model_scan(
    data: ImageSet,
    model_id: str,
    cfg: ScanConfig,
    mesa: MESAConfig | None,
    seed: int,
    full_search: bool = True,
    reference: list[list[float]] | None = None,
) -> ZooScanPlan:
    """The plan of one model's scan (``gdm-ray scan``, ``defend target_class=auto``)."""
    return plan_zoo_scan(data, [model_id], cfg, mesa, seed, full_search, calibrate=False, reference=reference)


@dataclass
class ModelScan:
    """What the scan found for one model."""

    model_id: str
    sha256: str
    path: str
    result: ScanResult | None  # the first pass, scored as the verdict uses it (None after an error)
    within: list[float] | None  # each class's anomaly against the model's own classes
    searches: dict[int, ClassSearch] = field(default_factory=dict)  # flagged class -> its full search
    error: str | None = None
    seconds: float = 0.0  # summed job time
    examples: int | None = None  # how many own clean examples it was scanned on (None: the shared data)


@dataclass
class ZooScan:
    models: dict[str, ModelScan]  # in the plan's order
    reference: str  # "zoo" (classes against the same class in other models) or "model"
    resumed: int  # first-pass chunks loaded from the resume state


class ScanContext(ModelContext):
    """What every job of a scan shares: the models, the clean data (shared, and
    the models' own examples) and the plan."""

    def __init__(
        self,
        models: Sequence[ModelBlob],
        data: ImageSet,
        eval_data: ImageSet,
        plan: ZooScanPlan,
        device: str = "cpu",
        examples: Mapping[str, ImageSet] | None = None,
    ) -> None:
        super().__init__(models, device)
        self.data, self.eval_data, self.plan = data, eval_data, plan
        self.examples = dict(examples or {})

    def data_of(self, model_id: str) -> ImageSet:
        """The clean images the model's searches use: its own examples, or the shared set."""
        return self.examples.get(model_id, self.data)

    def eval_of(self, model_id: str) -> ImageSet:
        """Where the model's MESA samples' ASR is measured: its own examples (there is no
        held-out part of so small a set), or the shared held-out split."""
        return self.examples.get(model_id, self.eval_data)


class ResumeState(Protocol):
    """Finished first-pass chunks kept between runs (``gdm_ray.store.scanstate.ScanState``)."""

    def key(self, model_id: str, sha256: str, cfg: ScanConfig, plan: ScanPlan, chunk: int) -> str: ...

    def load(self, key: str) -> list[ClassTrigger] | None: ...

    def save(self, key: str, found: list[ClassTrigger]) -> None: ...


@dataclass(frozen=True)
class FirstPassJob:
    model_id: str
    chunk: int


@dataclass(frozen=True)
class WindowJob:
    model_id: str
    plan: WindowPlan
    chunk: int


@dataclass(frozen=True)
class MesaJob:
    model_id: str
    target: int
    heat: HeatMap | None
    seed: int  # the class search's seed (MESA draws from mesa_seed(seed))
    first_pass: tuple[torch.Tensor, torch.Tensor] | None = None  # the class's first-pass (pattern, mask): sizes MESA


def first_pass_chunk(ctx: ScanContext, job: FirstPassJob) -> list[ClassTrigger]:
    m = job.model_id
    return scan_chunks(ctx.model(m), ctx.data_of(m), ctx.plan.scan, ctx.plan.first_pass_of(m), [job.chunk])


def window_chunk(ctx: ScanContext, job: WindowJob) -> dict[int, WindowFind]:
    return search_windows(ctx.model(job.model_id), ctx.data_of(job.model_id), ctx.plan.scan, job.plan, [job.chunk])


def class_mesa_job(ctx: ScanContext, job: MesaJob) -> tuple[MESA, MESAResult, float]:
    assert ctx.plan.mesa is not None
    return class_mesa(
        ctx.model(job.model_id),
        ctx.data_of(job.model_id),
        ctx.eval_of(job.model_id),
        job.target,
        ctx.plan.mesa,
        job.heat,
        mesa_seed(job.seed),
        ctx.plan.eval_seed,
        first_pass=job.first_pass,
    )


def _window_plan(data: ImageSet, cfg: ScanConfig, k: int, seed: int) -> WindowPlan:
    """What ``search_class`` places for class k with this seed."""
    return plan_windows(
        data,
        k,
        cfg,
        tuple(cfg.window) if cfg.window else None,
        tuple(cfg.stride) if cfg.stride else None,
        torch.Generator().manual_seed(window_seed(seed)),
    )


class _Run:
    """One run of a plan: the stages, and what each model has so far."""

    def __init__(
        self, plan: ZooScanPlan, ctx: ScanContext, executor: Executor, state: ResumeState | None, progress: Progress | None
    ) -> None:
        self.plan, self.ctx, self.executor, self.state, self.progress = plan, ctx, executor, state, progress
        self.out = {m: ModelScan(m, ctx.models[m].sha256, ctx.models[m].path, None, None) for m in plan.models}
        for m, own in ctx.examples.items():
            self.out[m].examples = len(own)
        self.resumed = 0

    def ok(self) -> list[str]:
        return [m for m, s in self.out.items() if s.error is None]

    def stage(self, name: str, fn: Callable, jobs: list, on_done: Callable[[JobResult], None]) -> None:
        """Run one stage; a failed job's error becomes its model's (the first one kept)."""
        if not jobs:
            return
        finished = [0]

        def handle(res: JobResult) -> None:
            scan = self.out[res.job.model_id]
            scan.seconds += res.seconds
            if res.error is not None:
                scan.error = scan.error or res.error
            elif scan.error is None:
                on_done(res)
            finished[0] += 1
            if self.progress is not None:
                self.progress(name, finished[0], len(jobs))

        self.executor.map(fn, jobs, self.ctx, on_result=handle)

    def _identity(self, m: str) -> str:
        """What a kept first-pass chunk must match besides the plan: the model file, and its own examples."""
        own = self.ctx.examples.get(m)
        return self.ctx.models[m].sha256 + (f"+examples-{examples_digest(own)}" if own is not None else "")

    def first_pass(self) -> None:
        plan = self.plan
        found: dict[str, dict[int, list[ClassTrigger]]] = {m: {} for m in plan.models}
        keys = {
            (m, i): self.state.key(m, self._identity(m), plan.scan, plan.first_pass_of(m), i) if self.state is not None else ""
            for m in plan.models
            for i in range(plan.first_pass_of(m).passes)
        }
        jobs = []
        for (m, i), key in keys.items():
            cached = self.state.load(key) if self.state is not None else None
            if cached is not None:
                found[m][i] = cached
                self.resumed += 1
            else:
                jobs.append(FirstPassJob(m, i))

        def done(res: JobResult) -> None:
            j = res.job
            found[j.model_id][j.chunk] = res.value  # keyed: a result lands in its own slot
            if self.state is not None:  # kept as it arrives: a killed run resumes from here
                self.state.save(keys[(j.model_id, j.chunk)], res.value)

        self.stage("first pass", first_pass_chunk, jobs, done)
        for m in self.ok():
            triggers = [t for i in sorted(found[m]) for t in found[m][i]]
            result = scan_result(plan.first_pass_of(m), plan.scan, triggers, self.out[m].seconds)
            self.out[m].result, self.out[m].within = result, list(result.anomaly)

    def judge(self) -> str:
        """Rescore against the zoo or the given reference; returns what the anomaly is measured against."""
        ok = self.ok()
        if self.plan.reference is not None:
            for m in ok:
                r = self.out[m].result
                self.out[m].result = rescore(r, reference_anomaly([[c.size for c in r.classes], *self.plan.reference])[0])
            return "zoo"
        if self.plan.calibrate and len(ok) >= MIN_ZOO:
            table = reference_anomaly([[c.size for c in self.out[m].result.classes] for m in ok])
            for m, a in zip(ok, table):
                self.out[m].result = rescore(self.out[m].result, a)
            return "zoo"
        return "model"

    def flagged(self) -> list[tuple[str, int]]:
        return [(m, k) for m in self.ok() for k in self.out[m].result.flagged]

    def windows(self) -> dict[tuple[str, int], HeatMap]:
        plans = {(m, k): _window_plan(self.ctx.data_of(m), self.plan.scan, k, self.plan.class_seed(k)) for m, k in self.flagged()}
        finds: dict[tuple[str, int], dict[int, WindowFind]] = {key: {} for key in plans}
        seconds: dict[tuple[str, int], float] = dict.fromkeys(plans, 0.0)
        jobs = [WindowJob(m, p, i) for (m, _), p in plans.items() for i in range(len(p.chunks))]

        def done(res: JobResult) -> None:
            key = (res.job.model_id, res.job.plan.target)
            finds[key].update(res.value)  # keyed by window: a repeated chunk overwrites itself
            seconds[key] += res.seconds

        self.stage("moving windows", window_chunk, jobs, done)
        ok = set(self.ok())
        return {key: window_result(p, finds[key], self.plan.scan, seconds[key]) for key, p in plans.items() if key[0] in ok}

    def _first_pass(self, m: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        found = next(c for c in self.out[m].result.classes if c.target == k)
        return found.pattern, found.mask

    def mesa(self, heats: dict[tuple[str, int], HeatMap]) -> dict[tuple[str, int], ClassSearch]:
        searches = {(m, k): ClassSearch(heats.get((m, k)), None, None, None) for m, k in self.flagged()}
        if self.plan.mesa is None:
            return searches
        jobs = [MesaJob(m, k, heats.get((m, k)), self.plan.class_seed(k), self._first_pass(m, k)) for m, k in searches]

        def done(res: JobResult) -> None:
            mesa, result, asr = res.value
            key = (res.job.model_id, res.job.target)
            searches[key] = ClassSearch(res.job.heat, mesa, result, asr)

        self.stage("MESA searches", class_mesa_job, jobs, done)
        return searches


def run_zoo_scan(
    plan: ZooScanPlan,
    models: Sequence[ModelBlob],
    data: ImageSet,
    eval_data: ImageSet,
    executor: Executor,
    device: str = "cpu",
    state: ResumeState | None = None,
    progress: Progress | None = None,
    loaded: nn.Module | None = None,
    examples: Mapping[str, ImageSet] | None = None,
) -> ZooScan:
    """Run ``plan`` on ``models`` (one ``ModelBlob`` per planned id) through
    ``executor``: the first pass (chunks resumed from / kept in ``state``),
    the reference, then each flagged class's windows and MESA. A model whose
    job fails gets that error and no later stage; the others go on.
    ``loaded``: the one planned model, already loaded on ``device`` (the
    in-process executor then does not load it again). ``examples``: the own
    clean images the plan was made with (model id -> images)."""
    given = {m.model_id for m in models}
    if given != set(plan.models):
        raise ConfigError(f"scan: models {sorted(given ^ set(plan.models))} are not both planned and given")
    examples = dict(examples or {})
    planned = {m: len(p.eval_idx) + len(p.search_idx) for m, p in plan.own.items()}
    if {m: len(x) for m, x in examples.items()} != planned:
        raise ConfigError(f"scan: own examples given for {sorted(examples)}, planned for {sorted(planned)} (or of other sizes)")
    ctx = ScanContext(models, data, eval_data, plan, device, examples)
    if loaded is not None:
        if len(plan.models) != 1:
            raise ConfigError(f"scan: a loaded model is for a one-model plan, not {len(plan.models)} models")
        ctx.hold(plan.models[0], loaded)
    run = _Run(plan, ctx, executor, state, progress)
    run.first_pass()
    reference = run.judge()
    heats = run.windows() if plan.window else {}
    if plan.window or plan.mesa is not None:
        for (m, k), found in run.mesa(heats).items():
            run.out[m].searches[k] = found
    for s in run.out.values():  # a failed model keeps its error and nothing half-done
        if s.error is not None:
            s.result, s.within, s.searches = None, None, {}
    return ZooScan(run.out, reference, run.resumed)
