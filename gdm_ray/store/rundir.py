"""A command's output folder, written so that nothing half-written is visible.

Files are written into a hidden staging folder beside the destination and
moved into place (one ``os.replace`` per file) only when the command
succeeds; a failed command removes the staging folder and leaves any earlier
contents of the destination as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from gdm_ray.core.errors import ConfigError

__all__ = ["RunDir", "write_json", "default_out", "publish"]


def publish(tmp: str | Path, final: str | Path) -> None:
    """Rename a finished temp file into place with ordinary permissions
    (mkstemp makes files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, final)


def default_out(command: str, root: str | Path = "gdm-ray-runs") -> Path:
    """./gdm-ray-runs/<command>-<YYYYmmdd-HHMMSS>[-k], new each run."""
    base = Path(root) / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


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


class RunDir:
    """Stage a run's outputs and publish them together on success.

    >>> with RunDir(None, "attack") as run:
    ...     write_json(run.path("metrics.json"), {...})
    >>> run.final  # where they landed
    """

    def __init__(self, out: str | Path | None, command: str) -> None:
        if out is not None and str(out).startswith("s3://"):
            raise ConfigError(f"out={out}: writing command outputs to S3 is not supported yet; use a local folder")
        self.final = Path(out) if out not in (None, "") else default_out(command)
        if self.final.exists() and not self.final.is_dir():
            raise ConfigError(f"out={self.final} exists and is not a folder")
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.stage = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}.partial-"))
        except OSError as exc:
            raise ConfigError(f"out={self.final}: cannot write there ({exc.strerror})") from None

    def path(self, name: str) -> Path:
        """Where to write ``name`` now (inside the staging folder)."""
        p = self.stage / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self) -> Path:
        self.final.mkdir(parents=True, exist_ok=True)
        for src in sorted(self.stage.rglob("*")):
            if src.is_file():
                dst = self.final / src.relative_to(self.stage)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
        shutil.rmtree(self.stage, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
