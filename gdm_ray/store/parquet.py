"""Parquet tables of results (DESIGN.md section 3, "Results"), local or on S3.

A local table is written to a temporary name beside its destination and
renamed; an S3 table is one PUT of the whole file. Either way a reader sees
the previous table or the new one, never half a file.

Runs are the partitions: each command's out= folder holds its own tables,
and :func:`read_results` reads one table across every run under a root
(local folder or s3:// prefix) with a ``run`` column naming the folder.
Zoo-scan rows are keyed by ``model_id`` inside each run.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from gdm_ray.store.atomic import publish
from gdm_ray.store.s3 import S3, StoreError, is_s3, join_uri

__all__ = ["SCHEMA_VERSION", "write_rows", "read_rows", "write_table", "read_table", "read_results", "list_parquet"]

SCHEMA_VERSION = 1


def write_rows(
    path: str | Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None, store: Mapping[str, Any] | None = None
) -> str:
    """Write ``rows`` (dicts with the same keys) as one Parquet file, atomically."""
    table = pa.Table.from_pylist([{"schema_version": SCHEMA_VERSION, **r} for r in rows], schema=schema)
    return write_table(path, table, store)


def write_table(path: str | Path, table: pa.Table, store: Mapping[str, Any] | None = None) -> str:
    if is_s3(str(path)):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        S3(store).put_bytes(str(path), buf.getvalue(), "application/vnd.apache.parquet")
        return str(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        publish(tmp, path)  # mkstemp's 0600 would hide the table from other users
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(path)


def read_table(path: str | Path, store: Mapping[str, Any] | None = None) -> pa.Table:
    if is_s3(str(path)):
        return pq.read_table(io.BytesIO(S3(store).get_bytes(str(path))))
    return pq.read_table(str(path))


def read_rows(path: str | Path, store: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    return read_table(path, store).to_pylist()


def list_parquet(root: str | Path, under: str = "", store: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """The Parquet files below ``root/under`` (a folder or an s3:// prefix), sorted, as
    (path relative to root with "/" separators, where to read it)."""
    if is_s3(str(root)):
        base = str(root).rstrip("/")
        return [(u[len(base) + 1 :], u) for u in S3(store).list(join_uri(base, under)) if u.endswith(".parquet")]
    top = Path(root) / under
    return [(p.relative_to(root).as_posix(), str(p)) for p in sorted(top.rglob("*.parquet"))] if top.is_dir() else []


def read_results(root: str | Path, name: str = "verdicts.parquet", store: Mapping[str, Any] | None = None) -> pa.Table:
    """Every run's ``name`` table under ``root`` (one folder per run), concatenated,
    with a ``run`` column (the run folder's path relative to root)."""
    runs = [
        (str(PurePosixPath(rel).parent), where)
        for rel, where in list_parquet(root, "", store)
        if PurePosixPath(rel).name == name and not any(part.startswith(".") for part in rel.split("/"))
    ]
    if not runs:
        raise StoreError(f"{root}: no {name} in any run under it")
    tables = []
    for run, path in runs:
        t = read_table(path, store)
        tables.append(t.append_column("run", pa.array([run] * t.num_rows, pa.string())))
    return pa.concat_tables(tables, promote_options="default")
