"""Which config and which code made a result (every row and card carries both)."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path

import gdm_ray

__all__ = ["config_hash", "code_version"]

# Keys that change where or how visibly a run writes, not what it computes.
_NOT_HASHED = frozenset({"out", "progress", "device", "threads", "store", "dataset"})


def config_hash(cfg: Mapping) -> str:
    """A short, stable hash of a resolved config (plain dict), ignoring output-only keys."""
    body = {k: v for k, v in cfg.items() if k not in _NOT_HASHED}
    text = json.dumps(body, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The package version, plus the git commit (and '+dirty') when run from a checkout."""
    root = Path(gdm_ray.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    if not commit:
        return gdm_ray.__version__
    return f"{gdm_ray.__version__}+g{commit}{'.dirty' if dirty else ''}"
