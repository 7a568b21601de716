"""In-process Ray as gdm_ray.dist.runtime starts it (not in test_dist.py: its
two-node cluster would be joined instead while that module runs)."""

from __future__ import annotations

import os

import pytest

from gdm_ray.core.errors import ConfigError
from gdm_ray.dist.runtime import RayConfig


@pytest.mark.parametrize("niceness, expected", [(0, 0), (None, 15)])
def test_worker_niceness(niceness, expected, monkeypatch):
    """In-process Ray's workers run at ray.worker_niceness (0 by default), not Ray's 15."""
    import ray

    from gdm_ray.dist.runtime import init_ray

    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    with pytest.raises(ConfigError, match="ray.worker_niceness=-1"):
        RayConfig(worker_niceness=-1)
    assert init_ray(RayConfig(num_cpus=1, worker_niceness=niceness))
    try:
        assert ray.get(ray.remote(lambda: os.nice(0)).remote()) == expected
    finally:
        ray.shutdown()
        os.environ.pop("RAY_worker_niceness", None)  # init_ray set it for the raylet; monkeypatch restores the rest
