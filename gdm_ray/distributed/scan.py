"""Scans as Ray tasks, spread over the cluster: every (model, chunk of
classes) of the first pass, every chunk of a flagged class's moving windows,
and every flagged class's MESA search is one task.

Why tasks over classes and models, and not one actor per staircase level:
the N levels of a MESA search already share one classifier forward/backward
per step, which bench/results/mesa_batching.md measures faster (1.1-1.4x)
than N separate loops on the same CPUs; so a search stays batched in one
task and the parallelism is across classes, windows and models.

Exactly once: a result is stored under its key ((model, chunk), (model,
class, window) or (model, class)) as it arrives, so a task that Ray retries after its worker died
replaces nothing and adds nothing. Resume: each finished first-pass chunk is
also written to a state folder beside the output (safetensors, no pickle); a
zoo-scan started again with the same ``out=`` loads those instead of
searching again. Windows and MESA searches are not kept there: a resumed run
repeats them (they are the short part of a zoo scan).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from gdm_ray.core.data import ImageSet
from gdm_ray.core.class_search import ClassSearch, class_mesa, mesa_seed, window_seed
from gdm_ray.core.first_pass import ClassTrigger, ScanConfig, ScanPlan, scan_chunks
from gdm_ray.core.moving_window import HeatMap, WindowPlan, plan_windows, search_windows, window_result
from gdm_ray.core.mesa import MESAConfig
from gdm_ray.core.model_io import load_model_bytes
from gdm_ray.distributed.runtime import RayConfig, pin_threads, task_options
from gdm_ray.store.scanstate import ScanState

__all__ = ["ModelRef", "TaskLog", "put_model", "run_first_passes", "run_class_searches"]


@dataclass(frozen=True)
class ModelRef:
    """A model as tasks receive it: the file's bytes in the object store."""

    model_id: str
    path: str
    sha256: str
    blob: Any  # ray.ObjectRef of the file's bytes
    arch: str | None
    shape: tuple[int, int, int]
    num_classes: int


def put_model(model_id: str, path: Path, sha256: str, arch: str | None, shape: tuple[int, int, int], num_classes: int) -> ModelRef:
    return ModelRef(model_id, str(path), sha256, ray.put(path.read_bytes()), arch, tuple(shape), int(num_classes))


@dataclass
class TaskLog:
    """Where tasks ran and how many were loaded from an earlier run."""

    nodes: Counter = dataclasses.field(default_factory=Counter)  # node id -> tasks finished there
    run: int = 0
    resumed: int = 0
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # model id -> summed first-pass task time

    def summary(self) -> dict[str, Any]:
        return {"tasks_run": self.run, "tasks_resumed": self.resumed, "nodes": dict(self.nodes)}


def _node() -> str:
    return ray.get_runtime_context().get_node_id()


def _device() -> str:
    """The GPU Ray gave this task (ray.task_gpus > 0), else the CPU."""
    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def _task_model(blob: bytes, m: ModelRef, cpus: float, keep: bool) -> torch.nn.Module:
    """Inside a task: torch threads pinned to the task's CPUs (and freed memory
    kept, with ray.keep_freed_memory), the model loaded from its bytes."""
    pin_threads(cpus, keep)
    return load_model_bytes(blob, m.path, m.shape, m.num_classes, m.arch, _device()).module


@ray.remote
def _first_pass_task(blob: bytes, m: ModelRef, data: ImageSet, cfg: ScanConfig, plan: ScanPlan, chunk: int, cpus: float, keep: bool):
    t0 = time.perf_counter()
    model = _task_model(blob, m, cpus, keep)
    return scan_chunks(model, data, cfg, plan, [chunk]), _node(), time.perf_counter() - t0


@ray.remote
def _window_task(blob: bytes, m: ModelRef, data: ImageSet, cfg: ScanConfig, plan: WindowPlan, chunk: int, cpus: float, keep: bool):
    t0 = time.perf_counter()
    model = _task_model(blob, m, cpus, keep)
    return search_windows(model, data, cfg, plan, [chunk]), _node(), time.perf_counter() - t0


@ray.remote
def _mesa_task(blob: bytes, m: ModelRef, data: ImageSet, eval_data: ImageSet, k: int, mesa_cfg: MESAConfig,
               heat: HeatMap | None, seed: int, eval_seed: int, cpus: float, keep: bool):  # fmt: skip
    model = _task_model(blob, m, cpus, keep)
    return class_mesa(model, data, eval_data, k, mesa_cfg, heat, seed, eval_seed), _node()


def _cause(exc: BaseException) -> str:
    """The first line of what went wrong inside a task."""
    inner = getattr(exc, "cause", None) or exc
    text = str(inner).strip().splitlines()
    return text[-1][:300] if text else type(inner).__name__


def _gather(pending: dict[Any, Any], on_done: Callable[[Any, Any], None], on_error: Callable[[Any, str], None],
            progress: Callable[[int], None] | None) -> None:  # fmt: skip
    """Collect task results as they finish (any order), one callback each."""
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            key = pending.pop(ref)
            try:
                value = ray.get(ref)
            except (ray.exceptions.RayError, OSError) as exc:
                on_error(key, _cause(exc))
            else:
                on_done(key, value)
            if progress:
                progress(1)


def _bar(total: int, desc: str, show: bool):
    if not show or total == 0:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="task", file=sys.stderr, mininterval=1.0, leave=False, dynamic_ncols=True)
    return bar.update, bar.close


def run_first_passes(
    rcfg: RayConfig,
    models: Iterable[ModelRef],
    data: ImageSet,
    cfg: ScanConfig,
    plan: ScanPlan,
    state: ScanState,
    log: TaskLog,
    progress: bool = True,
) -> tuple[dict[str, list[ClassTrigger]], dict[str, str]]:
    """Every chunk of every model's first pass, as tasks. Returns each
    model's found triggers (all chunks) and the error of each model that failed."""
    data_ref = ray.put(data)
    opts = task_options(rcfg)
    found: dict[str, dict[int, list[ClassTrigger]]] = {}
    errors: dict[str, str] = {}
    pending: dict[Any, tuple[str, int, str]] = {}
    for m in models:
        found[m.model_id] = {}
        log.seconds.setdefault(m.model_id, 0.0)
        for i in range(plan.passes):
            key = ScanState.key(m.model_id, m.sha256, cfg, plan, i)
            cached = state.load(key)
            if cached is not None:
                found[m.model_id][i] = cached
                log.resumed += 1
                continue
            ref = _first_pass_task.options(**opts).remote(m.blob, m, data_ref, cfg, plan, i, float(rcfg.task_cpus),
                                                         bool(rcfg.keep_freed_memory))
            pending[ref] = (m.model_id, i, key)

    def done(key: tuple[str, int, str], value: tuple[list[ClassTrigger], str, float]) -> None:
        mid, i, skey = key
        triggers, node, seconds = value
        found[mid][i] = triggers  # keyed: a retried task's result lands in the same slot
        state.save(skey, triggers)
        log.nodes[node] += 1
        log.run += 1
        log.seconds[mid] += seconds

    def failed(key: tuple[str, int, str], msg: str) -> None:
        errors.setdefault(key[0], msg)

    update, close = _bar(len(pending), "first pass (Ray tasks)", progress)
    try:
        _gather(pending, done, failed, update)
    finally:
        close()
    out = {mid: [t for i in sorted(parts) for t in parts[i]] for mid, parts in found.items() if mid not in errors}
    return out, errors


def run_class_searches(
    rcfg: RayConfig,
    requests: list[tuple[ModelRef, int, int]],
    data: ImageSet,
    eval_data: ImageSet,
    cfg: ScanConfig,
    mesa_cfg: MESAConfig | None,
    window: bool,
    eval_seed: int,
    log: TaskLog,
    progress: bool = True,
) -> tuple[dict[tuple[str, int], ClassSearch], dict[str, str]]:
    """The full search of each (model, class, seed) request, as tasks: with
    ``window``, every chunk of every class's windows is a task, and the heat
    maps are put together here; then each class's MESA is a task. Gives what
    ``search_class`` gives in one process."""
    if not requests:
        return {}, {}
    data_ref, eval_ref = ray.put(data), ray.put(eval_data)
    opts = task_options(rcfg)
    cpus, keep = float(rcfg.task_cpus), bool(rcfg.keep_freed_memory)
    errors: dict[str, str] = {}
    heats: dict[tuple[str, int], HeatMap | None] = {(m.model_id, k): None for m, k, _ in requests}

    def failed(key: tuple, msg: str) -> None:
        errors.setdefault(key[0], msg)

    if window:
        stride = tuple(cfg.stride) if cfg.stride else None
        plans = {(m.model_id, k): plan_windows(data, k, cfg, tuple(cfg.window) if cfg.window else None, stride,
                                               torch.Generator().manual_seed(window_seed(seed)))
                 for m, k, seed in requests}  # fmt: skip
        finds: dict[tuple[str, int], dict[int, Any]] = {key: {} for key in plans}
        seconds: Counter = Counter()
        pending = {
            _window_task.options(**opts).remote(m.blob, m, data_ref, cfg, plans[(m.model_id, k)], i, cpus, keep): (m.model_id, k)
            for m, k, _ in requests for i in range(len(plans[(m.model_id, k)].chunks))
        }  # fmt: skip

        def window_done(key: tuple[str, int], value: tuple[dict[int, Any], str, float]) -> None:
            finds[key].update(value[0])  # keyed by window: a retried chunk overwrites itself
            seconds[key] += value[2]
            log.nodes[value[1]] += 1
            log.run += 1

        update, close = _bar(len(pending), "moving windows (Ray tasks)", progress)
        try:
            _gather(pending, window_done, failed, update)
        finally:
            close()
        for key, plan in plans.items():
            if key[0] not in errors:
                heats[key] = window_result(plan, finds[key], cfg, seconds[key])
    out = {key: ClassSearch(heat, None, None, None) for key, heat in heats.items() if key[0] not in errors}
    if mesa_cfg is None:
        return out, errors
    pending = {
        _mesa_task.options(**opts).remote(m.blob, m, data_ref, eval_ref, k, mesa_cfg, heats[(m.model_id, k)], mesa_seed(seed),
                                          eval_seed, cpus, keep): (m.model_id, k)
        for m, k, seed in requests if m.model_id not in errors
    }  # fmt: skip

    def mesa_done(key: tuple[str, int], value: tuple[tuple[Any, Any, float], str]) -> None:
        mesa, res, asr = value[0]
        out[key] = ClassSearch(heats[key], mesa, res, asr)
        log.nodes[value[1]] += 1
        log.run += 1

    update, close = _bar(len(pending), "MESA searches (Ray tasks)", progress)
    try:
        _gather(pending, mesa_done, failed, update)
    finally:
        close()
    return {k: v for k, v in out.items() if k[0] not in errors}, errors
