"""The results dataset: every run's tables in one Parquet dataset, partitioned by run and model.

Each command's out= folder keeps its own tables (DESIGN.md section 3). With
``dataset=ROOT`` (a local folder or an s3:// prefix) the same rows also land in

    ROOT/<table>/run=<run>/model=<model>/part-<id>.parquet

a Hive-partitioned dataset that pyarrow, DuckDB, Spark or Athena read as one
table with ``run`` and ``model`` columns, and that a query for one model
reads without touching the others. ``run`` is the name of the run's out=
folder; ``model`` is the model id (the model file's stem). Partition values
are percent-encoded (pyarrow's Hive partitioning decodes them).

Every file is written whole (temp name + rename locally, one PUT on S3) under
a name no earlier write used, after the run's own folder is published, so no
file is ever overwritten. Running again with the same out= folder name
replaces that run's partitions: once every new file is in place, the run's
older files of those tables are removed (until then a reader may see both).
If writing fails, the files this publish added are removed again (best
effort on S3, whose endpoint may be gone) and the earlier files were never
touched, so a reader sees the earlier state.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.parquet as pq

from gdm_ray.core.errors import ConfigError
from gdm_ray.store.atomic import publish
from gdm_ray.store.parquet import SCHEMA_VERSION, list_parquet, read_table
from gdm_ray.store.s3 import S3, StoreError, is_s3, join_uri

__all__ = ["TABLES", "partition_dir", "PendingDataset", "read_dataset"]

TABLES = ("verdicts", "classes", "repairs", "trials")  # what the commands write (see gdm_ray.store.tables)


def _value(v: object) -> str:
    """A partition value as one path segment: percent-encoded, and never "." or ".."."""
    s = quote(str(v), safe="")
    if not s:
        raise ValueError("a partition value cannot be empty")
    return s.replace(".", "%2E") if s in (".", "..") else s


def partition_dir(table: str, run: str, model: str) -> str:
    """The dataset-relative folder of one partition: ``table/run=RUN/model=MODEL``."""
    return f"{table}/run={_value(run)}/model={_value(model)}"


class PendingDataset:
    """Partitions a run has staged; :meth:`publish` writes them once the run's folder is in place."""

    def __init__(self, root: str | Path, run: str | Path, store: Mapping[str, Any] | None = None) -> None:
        """``run``: the run's out= folder or prefix; its last path segment names the run."""
        self.root = str(root).rstrip("/") if is_s3(str(root)) else str(Path(root))
        self.run = str(run).rstrip("/").rsplit("/", 1)[-1]
        self.store = store
        self.s3 = S3(store) if is_s3(self.root) else None
        if self.s3 is not None:
            self.s3.check_bucket(self.root)  # wrong credentials or no bucket: fail before the work
        elif Path(self.root).exists() and not Path(self.root).is_dir():
            raise ConfigError(f"dataset={self.root} exists and is not a folder")
        self.stage: Path | None = None  # made by the first add
        self.tables: set[str] = set()
        # a fresh file name per publish: new files never overwrite the ones a reader may be reading
        self.part = f"part-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"

    def add(self, table: str, rows: Iterable[dict[str, Any]], schema: pa.Schema, model: str | None = None) -> None:
        """Stage ``rows`` of ``table`` (one file per model: each row's ``model_id``, or ``model`` for all)."""
        if table not in TABLES:
            raise ValueError(f"unknown dataset table {table!r}")
        if self.stage is None:
            self.stage = Path(tempfile.mkdtemp(prefix="gdm-ray-dataset-"))
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            r = {"schema_version": SCHEMA_VERSION, **r}
            groups.setdefault(str(model if model is not None else r["model_id"]), []).append(r)
        for mid, part in groups.items():
            path = self.stage / partition_dir(table, self.run, mid) / self.part
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(part, schema=schema), path)
        self.tables.add(table)

    def publish(self) -> None:
        """Write the staged partitions into the dataset, then drop the run's older files of those tables."""
        if self.stage is None:
            return
        try:
            files = sorted(p for p in self.stage.rglob("*") if p.is_file())
            older = self._list([f"{t}/run={_value(self.run)}/" for t in sorted(self.tables)])
            done: list[str] = []  # new names: none of them is among the older files
            try:
                for src in files:
                    rel = src.relative_to(self.stage).as_posix()
                    self._put(src, rel)
                    done.append(rel)
            except BaseException as exc:
                left = [rel for rel in done if not self._remove(rel)]
                if left and isinstance(exc, StoreError):
                    raise StoreError(f"{exc}; {len(left)} dataset file(s) of this run could not be removed again") from None
                raise
            for rel in older:
                self._remove(rel)
        finally:
            self.discard()

    def discard(self) -> None:
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            self.stage = None

    def _list(self, prefixes: list[str]) -> list[str]:
        return [rel for pre in prefixes for rel, _ in list_parquet(self.root, pre, self.store)]

    def _put(self, src: Path, rel: str) -> None:
        if self.s3 is not None:
            self.s3.put_file(join_uri(self.root, rel), src)
            return
        dst = Path(self.root) / rel
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
            os.close(fd)
        except OSError as exc:
            raise StoreError(f"dataset={self.root}: cannot write {rel} ({exc.strerror})") from None
        try:
            shutil.copyfile(src, tmp)
            publish(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _remove(self, rel: str) -> bool:
        try:
            if self.s3 is not None:
                self.s3.delete(join_uri(self.root, rel))
            else:
                (Path(self.root) / rel).unlink(missing_ok=True)
            return True
        except (StoreError, OSError):
            return False


def read_dataset(
    root: str | Path, table: str, store: Mapping[str, Any] | None = None, run: str | None = None, model: str | None = None
) -> pa.Table:
    """One table of the dataset under ``root``, every run and model (or only ``run`` /
    ``model``), with ``run`` and ``model`` columns from the partition folders."""
    prefix = f"{table}/" + (f"run={_value(run)}/" if run is not None else "")
    found = list_parquet(root, prefix, store)
    tables = []
    for rel, where in found:
        parts = rel.split("/")
        if len(parts) != 4 or parts[-1].startswith((".", "_")) or not parts[1].startswith("run=") or not parts[2].startswith("model="):
            continue  # temp files and anything that is not a partition
        r, m = unquote(parts[1][4:]), unquote(parts[2][6:])
        if model is not None and m != str(model):
            continue
        t = read_table(where, store)
        t = t.append_column("run", pa.array([r] * t.num_rows, pa.string()))
        tables.append(t.append_column("model", pa.array([m] * t.num_rows, pa.string())))
    if not tables:
        which = "".join(f" {k}={v}" for k, v in (("run", run), ("model", model)) if v is not None)
        raise StoreError(f"dataset={root}: no {table} rows{which}")
    return pa.concat_tables(tables, promote_options="default")
