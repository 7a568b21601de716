"""gdm_ray.core.allocator: freed tensor memory stays in the process (no page
faults when the next step allocates the same buffers again)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gdm_ray.cli.compose import compose_settings
from gdm_ray.core.errors import ConfigError

# One 64 MiB buffer allocated, touched and freed 10 times, before and after
# keep_freed_memory(): glibc mmaps a buffer this big (above its 32 MiB cap)
# and unmaps it on free, so each round faults in 16k fresh pages.
_CHILD = """
import resource, sys, torch
from gdm_ray.core.allocator import keep_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        x = torch.ones(16 << 20)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
applied = keep_freed_memory(sys.argv[1] == "on")
faults()  # the heap grows and settles
print(default, applied, faults())
"""


def _run(mode: str) -> tuple[int, bool, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), out[1] == "True", int(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_keep_freed_memory_stops_refaulting():
    default, applied, kept = _run("on")
    assert default > 10 * 16384 * 0.8, default  # every round faulted its 64 MiB in again
    assert applied
    assert kept < default / 4, (default, kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_keep_freed_memory_off_changes_nothing():
    default, applied, after = _run("off")
    assert not applied
    assert after > default / 2, (default, after)


def test_setup_rejects_a_non_boolean():
    from hydra.errors import HydraException

    with pytest.raises(HydraException, match="keep_freed_memory"):
        compose_settings("attack", ["keep_freed_memory=sometimes"])
