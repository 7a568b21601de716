"""How a planned workflow's jobs run: the executor protocol and the in-process executor.

A workflow (``scan_workflow``) fixes every job and its seed up front, then
hands each stage to an executor as ``map(fn, jobs, context)``: ``fn`` is a
plain top-level core function ``fn(context, job) -> result``, a job is a small
dataclass, and ``context`` holds what every job of the map shares (the data,
the models as file bytes), so a distributed executor ships it once per map
(``gdm_ray.distributed.executor.RayExecutor`` puts it in Ray's object store).
A job's answer depends on the context and the job alone, so any executor
gives the same results.

A job that raises becomes a ``JobResult`` with a one-line ``error``: a zoo
records one broken model and goes on.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from torch import nn

from gdm_ray.core.errors import ModelLoadError
from gdm_ray.core.model_io import load_model_bytes
from gdm_ray.core.weights import LoadOptions

__all__ = ["ModelBlob", "ModelContext", "JobResult", "Executor", "InProcessExecutor", "one_line", "OnResult"]

C = TypeVar("C")
J = TypeVar("J")
R = TypeVar("R")


@dataclass(frozen=True)
class ModelBlob:
    """A model as jobs receive it: the file's bytes and what loading needs."""

    model_id: str
    path: str
    sha256: str
    data: bytes = field(repr=False)
    options: LoadOptions | None  # how to read it (a state dict's architecture, key renames, normalisation); None: as it says itself
    shape: tuple[int, int, int]
    num_classes: int


class ModelContext:
    """The shared part of a map that holds models: ``model(model_id)`` loads a
    model from its bytes on ``device``, keeping the last one loaded (jobs come
    grouped by model, so a model is loaded once per stage, not per job, and a
    zoo of big models need not fit in memory)."""

    def __init__(self, models: Sequence[ModelBlob], device: str = "cpu") -> None:
        self.models = {m.model_id: m for m in models}
        self.device = str(device)
        self._last: tuple[tuple[str, str], nn.Module] | None = None

    def hold(self, model_id: str, module: nn.Module) -> None:
        """A model the caller already loaded on ``device``: jobs use it instead of loading it again."""
        self._last = ((model_id, self.device), module)

    def model(self, model_id: str) -> nn.Module:
        key = (model_id, self.device)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        m = self.models[model_id]
        try:
            module = load_model_bytes(m.data, m.path, m.shape, m.num_classes, None, self.device, m.options).module
        except ModelLoadError as exc:  # the error names the temporary copy; name the model's own path
            raise ModelLoadError(re.sub(r"model=\S+?(?=:)", f"model={m.path}", str(exc), count=1)) from None
        self._last = (key, module)
        return module

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_last"] = None  # a loaded module never travels: the receiver loads its own
        return state


@dataclass
class JobResult(Generic[J, R]):
    """One finished job: its value, or the one-line error that stopped it."""

    index: int  # position in the map's job list
    job: J
    value: R | None
    error: str | None
    seconds: float
    node: str = "local"


OnResult = Callable[[JobResult], None]


def one_line(exc: BaseException) -> str:
    """The first line of what went wrong (the exception's name when it says nothing)."""
    text = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return text[0][:300] if text else type(exc).__name__


class Executor(Protocol):
    """Runs ``fn(context, job)`` for each job; returns one ``JobResult`` per
    job in job order, calling ``on_result`` as each finishes (any order)."""

    def map(self, fn: Callable[[C, J], R], jobs: Sequence[J], context: C, on_result: OnResult | None = None) -> list[JobResult[J, R]]: ...

    def summary(self) -> dict[str, Any]:
        """Jobs run (and failed) so far, and how many ran on each node."""
        ...


class InProcessExecutor:
    """Jobs one after another, in job order, in this process (no Ray)."""

    def __init__(self) -> None:
        self.nodes: Counter = Counter()
        self.run = 0
        self.failed = 0

    def __enter__(self) -> InProcessExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Callable[[C, J], R], jobs: Sequence[J], context: C, on_result: OnResult | None = None) -> list[JobResult[J, R]]:
        out: list[JobResult[J, R]] = []
        for i, job in enumerate(jobs):
            t0 = time.perf_counter()
            try:
                value, error = fn(context, job), None
            except Exception as exc:  # one broken job is that job's error, as on Ray
                value, error = None, one_line(exc)
            res = JobResult(i, job, value, error, time.perf_counter() - t0)
            self._count(res)
            out.append(res)
            if on_result is not None:
                on_result(res)
        return out

    def _count(self, res: JobResult) -> None:
        if res.error is None:
            self.run += 1
            self.nodes[res.node] += 1
        else:
            self.failed += 1

    def summary(self) -> dict[str, Any]:
        return {"tasks_run": self.run, "tasks_failed": self.failed, "nodes": dict(self.nodes)}
