"""A command's output folder, written so that nothing half-written is visible.

Files are written into a hidden staging folder beside the destination and
moved into place (one ``os.replace`` per file) only when the command
succeeds; a failed command removes the staging folder and leaves any earlier
contents of the destination as they were.

``out=s3://bucket/prefix`` stages in a local temp folder and uploads on
success, one PUT per file (S3 shows an object whole or not at all). Tables
and JSON go last, so a reader that finds ``verdicts.parquet`` finds the
pictures and artifacts beside it; if an upload fails, the objects this run
had added are deleted again (best effort: the endpoint may be gone).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from gdm_ray.core.errors import ConfigError
from gdm_ray.store.atomic import publish, write_json
from gdm_ray.store.dataset import PendingDataset
from gdm_ray.store.fetch import cache_root
from gdm_ray.store.parquet import write_rows
from gdm_ray.store.s3 import S3, StoreError, is_s3, join_uri

__all__ = ["RunDir", "write_json", "default_out", "publish"]


def default_out(command: str, root: str | Path = "gdm-ray-runs") -> Path:
    """./gdm-ray-runs/<command>-<YYYYmmdd-HHMMSS>[-k], new each run."""
    base = Path(root) / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


class RunDir:
    """Stage a run's outputs and publish them together on success.

    >>> with RunDir(None, "attack") as run:
    ...     write_json(run.path("metrics.json"), {...})
    >>> run.final  # where they landed
    """

    def __init__(self, out: str | Path | None, command: str, store: Any = None, dataset: str | Path | None = None) -> None:
        self.s3: S3 | None = None
        self.dataset: PendingDataset | None = None
        if is_s3(str(out or "")):
            self.location = str(out).rstrip("/")
            self.s3 = S3(store)
            self.s3.check_bucket(self.location)  # wrong credentials or no bucket: fail before the work, not after
            self.final = None
            self.stage = Path(tempfile.mkdtemp(prefix=f"gdm-ray-{command}-"))
            self._open_dataset(dataset, store)
            return
        self.final = Path(out) if out not in (None, "") else default_out(command)
        self.location = str(self.final)
        if self.final.exists() and not self.final.is_dir():
            raise ConfigError(f"out={self.final} exists and is not a folder")
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.stage = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}.partial-"))
        except OSError as exc:
            raise ConfigError(f"out={self.final}: cannot write there ({exc.strerror})") from None
        self._open_dataset(dataset, store)

    def _open_dataset(self, dataset: str | Path | None, store: Any) -> None:
        if dataset in (None, ""):
            return
        try:
            self.dataset = PendingDataset(dataset, self.location, store)
        except BaseException:
            self.abort()
            raise

    def write_table(self, name: str, rows: list[dict[str, Any]], schema: Any, table: str, model: str | None = None) -> None:
        """Write ``rows`` as ``name`` in the run's folder and, with a dataset, as
        partitions of its ``table`` (one per model: see gdm_ray.store.dataset)."""
        write_rows(self.path(name), rows, schema)
        if self.dataset is not None:
            self.dataset.add(table, rows, schema, model)

    def join(self, name: str) -> str:
        """Where ``name`` will be once published (a path or an s3:// URI), for messages."""
        return join_uri(self.location, name)

    def state_dir(self) -> Path:
        """A local folder for resumable state of a run with this out= (see ScanState)."""
        if self.final is not None:
            return self.final.parent / f".{self.final.name}.state"
        return cache_root() / "state" / hashlib.sha256(self.location.encode()).hexdigest()[:24]

    def path(self, name: str) -> Path:
        """Where to write ``name`` now (inside the staging folder)."""
        p = self.stage / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self) -> str:
        self._publish_folder()
        if self.dataset is not None:  # after the folder: the dataset only names published runs
            self.dataset.publish()
        return self.location

    def _publish_folder(self) -> None:
        if self.s3 is not None:
            self._upload()
            return
        assert self.final is not None
        self.final.mkdir(parents=True, exist_ok=True)
        for src in sorted(self.stage.rglob("*")):
            if src.is_file():
                dst = self.final / src.relative_to(self.stage)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
        shutil.rmtree(self.stage, ignore_errors=True)

    def _upload(self) -> None:
        assert self.s3 is not None
        files = [p for p in self.stage.rglob("*") if p.is_file()]
        files.sort(key=lambda p: (p.suffix in (".parquet", ".json"), str(p)))
        before = set(self.s3.list(self.location))
        done: list[str] = []
        try:
            for f in files:
                uri = join_uri(self.location, f.relative_to(self.stage).as_posix())
                self.s3.put_file(uri, f)
                done.append(uri)
        except BaseException as exc:
            left = []
            for uri in done:
                if uri not in before:
                    try:
                        self.s3.delete(uri)
                    except StoreError:
                        left.append(uri)
            if left and isinstance(exc, StoreError):
                raise StoreError(f"{exc}; {len(left)} object(s) of this run could not be removed again") from None
            raise
        finally:
            shutil.rmtree(self.stage, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)
        if self.dataset is not None:
            self.dataset.discard()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
