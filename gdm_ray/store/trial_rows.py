"""The rows a sweep adds to trials.parquet: one per Tune trial, swept values typed by their config field."""

from __future__ import annotations

import json
import math
from typing import Any

import pyarrow as pa

__all__ = ["trial_rows"]


def trial_rows(records: list[Any], fields: list[pa.Field], hashes: list[str], code: str) -> list[dict[str, Any]]:
    """trials.parquet rows (gdm_ray.store.tables.trial_schema) from finished Tune trials
    (gdm_ray.distributed.sweep.TrialRecord: trial_id, params, metrics, error)."""
    names = (
        "objective",
        "asr_after",
        "acc_drop",
        "found_asr_after",
        "asr_before",
        "acc_before",
        "acc_after",
        "found_asr_before",
        "seconds",
        "search_seconds",
        "retrain_seconds",
    )
    rows = []
    for rec, h in zip(records, hashes):
        m = rec.metrics
        ok = rec.error is None
        row: dict[str, Any] = {"trial_id": rec.trial_id, "status": "TERMINATED" if ok else "ERROR", "error": rec.error}
        row.update({f.name: _cell(rec.params.get(f.name), f.type) for f in fields})
        for n in names:
            v = m.get(n)
            row[n] = float(v) if ok and isinstance(v, (int, float)) and math.isfinite(v) else None
        row["seconds"] = float(m["seconds"]) if isinstance(m.get("seconds"), (int, float)) else None
        row["finished_at"] = float(m["timestamp"]) if isinstance(m.get("timestamp"), (int, float)) else None
        row["node_ip"] = m.get("node_ip")
        row["seed"] = int(m["seed"]) if isinstance(m.get("seed"), int) else None
        row["config_hash"] = h
        row["code_version"] = m.get("code_version") or code
        rows.append(row)
    return rows


def _cell(value: Any, typ: pa.DataType) -> Any:
    if value is None:
        return None
    if typ == pa.float64():
        return float(value)
    if typ == pa.int64():
        return int(value)
    if typ == pa.list_(pa.float64()):
        return [float(v) for v in value]
    if typ == pa.list_(pa.int64()):
        return [int(v) for v in value]
    if typ == pa.string() and not isinstance(value, str):
        return json.dumps(value, default=str)
    return value
