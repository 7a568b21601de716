"""In-process Ray as gdm_ray.distributed.runtime starts it (not in test_dist.py: its
two-node cluster would be joined instead while that module runs)."""

from __future__ import annotations

import os

import pytest

from gdm_ray.core.errors import ConfigError
from gdm_ray.distributed.runtime import RayConfig


@pytest.mark.parametrize("niceness, expected", [(0, 0), (None, 15)])
def test_worker_niceness(niceness, expected, monkeypatch):
    """In-process Ray's workers run at ray.worker_niceness (0 by default), not Ray's 15."""
    import ray

    from gdm_ray.distributed.runtime import init_ray

    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    with pytest.raises(ConfigError, match="ray.worker_niceness=-1"):
        RayConfig(worker_niceness=-1)
    assert init_ray(RayConfig(num_cpus=1, worker_niceness=niceness))
    try:
        assert ray.get(ray.remote(lambda: os.nice(0)).remote()) == expected
    finally:
        ray.shutdown()
        os.environ.pop("RAY_worker_niceness", None)  # init_ray set it for the raylet; monkeypatch restores the rest


def test_workers_keep_freed_memory():
    """A task's pin_threads(cpus, True), as every gdm-ray task calls it with
    ray.keep_freed_memory, stops its worker refaulting freed tensor memory."""
    import ray

    from gdm_ray.distributed.runtime import init_ray

    @ray.remote(num_cpus=1)
    def faults(keep: bool) -> list[int]:
        import resource

        import torch

        from gdm_ray.distributed.runtime import pin_threads

        pin_threads(1, keep)
        for _ in range(3):
            torch.ones(16 << 20)  # the heap grows and settles
        rounds = []
        for _ in range(10):  # 64 MiB: glibc's default mmaps and unmaps it each time
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            torch.ones(16 << 20)
            rounds.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return rounds

    assert RayConfig().keep_freed_memory
    assert init_ray(RayConfig(num_cpus=1))
    try:
        off = ray.get(faults.remote(False))  # first: the setting stays for the worker's life
        on = ray.get(faults.remote(True))
    finally:
        ray.shutdown()
        os.environ.pop("RAY_worker_niceness", None)
    # The quietest round of each: the worker's other threads fault too, more on a
    # busy machine, but not in every round; a refaulting allocator does, 16384 pages each time.
    assert min(off) > 16384 * 0.8, off
    assert min(on) < min(off) / 4, (off, on)
