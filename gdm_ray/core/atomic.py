"""Write a file so that readers see the old one or the whole new one, never a part."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_target", "publish"]


def atomic_target(path: Path) -> tuple[Path, Path]:
    """(``path``, a unique temporary file beside it): write the temporary, then ``publish`` it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return path, Path(tmp)


def publish(tmp: str | Path, final: str | Path) -> None:
    """Give ``tmp`` the usual permissions and rename it onto ``final`` in one step."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files 0600
    os.replace(tmp, final)
