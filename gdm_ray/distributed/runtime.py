"""Starting or joining Ray, and the options every gdm-ray task and actor gets.

On the embedded default (``ray.address: null`` and no ``RAY_ADDRESS``) Ray
starts inside this process with ``ray.num_cpus`` CPUs; ``ray.address=auto``
or ``host:port`` joins an existing cluster. Each task asks for
``ray.task_cpus`` CPUs (and ``ray.task_gpus``, fractions allowed) plus any
custom ``ray.resources``, and pins torch's thread count to its CPUs: two
tasks on one node must not each spread over every core. gdm-ray's work is
stateless tasks (and Tune trials), not actors: a task whose worker dies is
run again up to ``ray.max_retries`` times (a trial: Tune's max_failures).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from gdm_ray.core.errors import ConfigError

__all__ = ["RayConfig", "init_ray", "task_options", "pin_threads"]


@dataclass
class RayConfig:
    """Where Ray runs and what each task needs (the ray config group)."""

    address: str | None = None  # None: in-process (or $RAY_ADDRESS); "auto" or host:port: an existing cluster
    num_cpus: int | None = None  # in-process Ray only: CPUs it may use (None: all)
    num_gpus: int | None = None  # in-process Ray only
    task_cpus: float = 1.0  # per task / actor; torch threads are pinned to this
    task_gpus: float = 0.0  # per task / actor; fractions share a GPU
    resources: dict[str, float] = field(default_factory=dict)  # custom resources each task needs
    max_retries: int = 3  # a task whose worker dies is run again (results are keyed, never duplicated)
    namespace: str = "gdm-ray"
    log_to_driver: bool = False  # workers' stdout/stderr on the driver's console
    # in-process Ray only: the workers' nice value. Ray's own default (15) lets any
    # nice-0 process take a busy CPU from a search; None keeps Ray's default.
    worker_niceness: int | None = 0
    # workers keep freed tensor memory for reuse (gdm_ray.core.allocator): no
    # page faults per step; the driver's own process follows the top-level key
    keep_freed_memory: bool = True

    def __post_init__(self) -> None:
        if not float(self.task_cpus) > 0:
            raise ConfigError(f"ray.task_cpus={self.task_cpus} must be > 0")
        if float(self.task_gpus) < 0:
            raise ConfigError(f"ray.task_gpus={self.task_gpus} must be >= 0")
        if int(self.max_retries) < 0:
            raise ConfigError(f"ray.max_retries={self.max_retries} must be >= 0")
        for key in ("num_cpus", "num_gpus"):
            v = getattr(self, key)
            if v is not None and int(v) < (1 if key == "num_cpus" else 0):
                raise ConfigError(f"ray.{key}={v} must be >= {1 if key == 'num_cpus' else 0}")
        n = self.worker_niceness
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 19):
            raise ConfigError(f"ray.worker_niceness={n!r} must be an integer in 0..19 (or null: Ray's default)")
        bad = {k: v for k, v in dict(self.resources).items() if not float(v) > 0}
        if bad:
            raise ConfigError(f"ray.resources={bad}: amounts must be > 0")


def init_ray(cfg: RayConfig) -> bool:
    """Start or join Ray unless it already runs in this process; True when
    this call started it (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"namespace": cfg.namespace, "log_to_driver": bool(cfg.log_to_driver)}
    if address is None:
        kwargs.update(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False)
        if cfg.worker_niceness is not None:  # read by the workers the raylet starts, from its environment
            os.environ["RAY_worker_niceness"] = str(int(cfg.worker_niceness))
    elif cfg.num_cpus is not None or cfg.num_gpus is not None:
        raise ConfigError(f"ray.num_cpus/num_gpus size an in-process Ray only; the cluster at {address} has its own")
    if address not in (None, "auto") and not address.startswith("ray://"):
        _probe(address)  # ray.init waits minutes for a GCS that is not there
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        hint = (
            ""
            if os.environ.get("RAY_AUTH_MODE") == "token"
            else "; a cluster with token authentication needs RAY_AUTH_MODE=token and its token"
        )
        raise ConfigError(f"ray.address={address}: cannot join the Ray cluster there ({str(exc).splitlines()[0][:200]}{hint})") from None
    return True


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the address, when nothing listens at host:port."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray.address={address} is not host:port, auto, or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"ray.address={address}: no Ray cluster there ({exc.strerror or exc})") from None


def task_options(cfg: RayConfig) -> dict[str, Any]:
    """``.options(...)`` for a gdm-ray task: resources and retries from config."""
    opts: dict[str, Any] = {"num_cpus": float(cfg.task_cpus), "num_gpus": float(cfg.task_gpus), "max_retries": int(cfg.max_retries)}
    if cfg.resources:
        opts["resources"] = {str(k): float(v) for k, v in dict(cfg.resources).items()}
    return opts


def pin_threads(cpus: float, keep_freed_memory: bool = False) -> int:
    """Inside a task: torch uses as many threads as the task has CPUs (>= 1);
    with ``keep_freed_memory`` the worker's malloc also keeps freed memory."""
    import torch

    from gdm_ray.core.allocator import keep_freed_memory as keep

    keep(keep_freed_memory)
    n = max(1, int(cpus))
    torch.set_num_threads(n)
    return n
