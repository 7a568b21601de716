"""Files that appear whole or not at all: write to a temp name beside the
destination, then rename into place. The bottom of gdm_ray.store: it imports
nothing of the store (only the core's rename), so every store module may use it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from gdm_ray.core.atomic import publish

__all__ = ["publish", "write_json"]


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
