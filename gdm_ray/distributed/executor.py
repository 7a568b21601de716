"""The Ray executor: a workflow's jobs (gdm_ray.core.executor) as Ray tasks,
spread over the cluster. In a scan, every (model, chunk of classes) of the
first pass, every chunk of a flagged class's moving windows and every flagged
class's MESA search is one task.

Why tasks over classes and models, and not one actor per staircase level:
the N levels of a MESA search already share one classifier forward/backward
per step, which is faster than N separate loops on the same CPUs
(bench/results/mesa_batching.md has the figures); so a search stays batched
in one task and the parallelism is across classes, windows and models.

Exactly once: each map puts its context (data, model bytes) in the object
store once, and a result is kept under its job's index as it arrives, so a
task that Ray retries after its worker died (``ray.max_retries``) replaces
nothing and adds nothing. Resume (finished first-pass chunks kept beside the
output) is the workflow's, the same on either executor.
"""

from __future__ import annotations

import copy
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ray
import torch

from gdm_ray.core.executor import JobResult, ModelContext, OnResult, one_line
from gdm_ray.distributed.runtime import RayConfig, init_ray, pin_threads, task_options

__all__ = ["RayExecutor"]

C = TypeVar("C")
J = TypeVar("J")
R = TypeVar("R")


@ray.remote
def _job_task(fn: Callable[[Any, Any], Any], context: Any, job: Any, cpus: float, keep: bool) -> tuple[Any, str, float]:
    """One job inside a worker: torch threads pinned to the task's CPUs (and
    freed memory kept), models loaded on the GPU Ray gave the task, if any."""
    pin_threads(cpus, keep)
    if isinstance(context, ModelContext):
        context = copy.copy(context)  # the worker's own copy: its device is the task's
        context.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    value = fn(context, job)
    return value, ray.get_runtime_context().get_node_id(), time.perf_counter() - t0


def _cause(exc: BaseException) -> str:
    """The first line of what went wrong inside a task (the task's own exception, not Ray's wrapper)."""
    return one_line(getattr(exc, "cause", None) or exc)


class RayExecutor:
    """Jobs as Ray tasks with the ``RayConfig``'s resources and retries.

    As a context manager it starts (or joins) Ray unless it already runs in
    this process, and shuts down what it started. ``progress`` shows a bar
    per map on stderr."""

    def __init__(self, cfg: RayConfig, progress: bool = False) -> None:
        self.cfg = cfg
        self.progress = progress
        self.nodes: Counter = Counter()  # node id -> tasks finished there
        self.run = 0
        self.failed = 0
        self._started = False

    def __enter__(self) -> RayExecutor:
        self._started = init_ray(self.cfg)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            ray.shutdown()
            self._started = False

    def map(self, fn: Callable[[C, J], R], jobs: Sequence[J], context: C, on_result: OnResult | None = None) -> list[JobResult[J, R]]:
        if not jobs:
            return []
        if not ray.is_initialized():
            init_ray(self.cfg)
            self._started = True
        ctx = ray.put(context)  # once per map, however many tasks read it
        opts = {**task_options(self.cfg), "name": fn.__name__}
        cpus, keep = float(self.cfg.task_cpus), bool(self.cfg.keep_freed_memory)
        pending = {_job_task.options(**opts).remote(fn, ctx, job, cpus, keep): i for i, job in enumerate(jobs)}
        out: dict[int, JobResult[J, R]] = {}
        bar = self._bar(len(pending), fn.__name__)
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    try:
                        value, node, seconds = ray.get(ref)
                        res: JobResult[J, R] = JobResult(i, jobs[i], value, None, seconds, node)
                        self.run += 1
                        self.nodes[node] += 1
                    except (ray.exceptions.RayError, OSError) as exc:
                        res = JobResult(i, jobs[i], None, _cause(exc), 0.0, "")
                        self.failed += 1
                    out[i] = res  # keyed by job: a retried task fills its own slot once
                    if on_result is not None:
                        on_result(res)
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [out[i] for i in range(len(jobs))]

    def _bar(self, total: int, desc: str):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=f"{desc} (Ray tasks)", unit="task", file=sys.stderr, mininterval=1.0, leave=False, dynamic_ncols=True)

    def summary(self) -> dict[str, Any]:
        return {"tasks_run": self.run, "tasks_failed": self.failed, "nodes": dict(self.nodes)}
