"""Parquet tables of results (DESIGN.md section 3, "Results").

Local paths only for now; S3 comes with the store issue. A table is written
to a temporary name beside its destination and renamed, so a reader never
sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from gdm_ray.store.rundir import publish

__all__ = ["SCHEMA_VERSION", "write_rows", "read_rows"]

SCHEMA_VERSION = 1


def write_rows(path: str | Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> Path:
    """Write ``rows`` (dicts with the same keys) as one Parquet file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{"schema_version": SCHEMA_VERSION, **r} for r in rows], schema=schema)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        publish(tmp, path)  # mkstemp's 0600 would hide the table from other users
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    return pq.read_table(str(path)).to_pylist()
