"""Schemas of the scan tables (DESIGN.md section 3, "Results").

Fixed schemas, so a table whose rows are all clean (every ``target_class``
null) or all failed loads still has the contract's column types, and tables
from different runs concatenate.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["VERDICT_SCHEMA", "CLASS_SCHEMA", "REPAIR_SCHEMA", "trial_schema"]


def _table(*fields: pa.Field) -> pa.Schema:
    """A row schema: the schema version first, the provenance every row carries last."""
    return pa.schema(
        [pa.field("schema_version", pa.int32()), *fields, pa.field("config_hash", pa.string()), pa.field("code_version", pa.string())]
    )


# One row per model. ``error`` is set (and the verdict columns null) when the
# model could not be loaded or scanned.
VERDICT_SCHEMA = _table(
    pa.field("model_id", pa.string()),
    pa.field("model_path", pa.string()),
    pa.field("model_sha256", pa.string()),
    pa.field("error", pa.string()),
    pa.field("backdoored", pa.bool_()),
    pa.field("score", pa.float64()),
    pa.field("target_class", pa.int64()),
    pa.field("flagged", pa.list_(pa.int64())),
    pa.field("method", pa.string()),
    pa.field("reference", pa.string()),  # what the anomaly is measured against: "model" (its classes) or "zoo"
    pa.field("seconds", pa.float64()),
    # zoo-scan: the clean images the model was scanned on: "own:N" (its own example folder, N images)
    # or "shared" (data=), with why in brackets when it had examples of its own; null from scan
    pa.field("examples", pa.string()),
)

# One row per (model, class).
CLASS_SCHEMA = _table(
    pa.field("model_id", pa.string()),
    pa.field("class", pa.int64()),
    pa.field("class_name", pa.string()),
    pa.field("trigger_size", pa.float64()),
    pa.field("trigger_asr", pa.float64()),
    pa.field("valid", pa.bool_()),
    pa.field("anomaly", pa.float64()),  # the index the verdict uses (see the verdict's reference)
    pa.field("anomaly_in_model", pa.float64()),  # against the model's other classes (natural triggers show here)
    pa.field("flagged", pa.bool_()),
)

# One row per repair (``gdm-ray defend``'s repair.parquet). The ASR, robust
# accuracy (R-Acc) and DER columns are of the real trigger (null when defend
# did not know it); the found triggers' ASR is the mean over the repaired
# classes (null for finetune, which searches none).
REPAIR_SCHEMA = _table(
    pa.field("model_id", pa.string()),
    pa.field("model_path", pa.string()),
    pa.field("model_sha256", pa.string()),
    pa.field("method", pa.string()),  # mesa | baseline | finetune
    pa.field("target_class", pa.string()),  # what was asked: a class index or "auto"
    pa.field("targets", pa.list_(pa.int64())),  # the classes repaired, in repair order (empty: nothing found)
    pa.field("asr_before", pa.float64()),
    pa.field("asr_after", pa.float64()),
    pa.field("acc_before", pa.float64()),
    pa.field("acc_after", pa.float64()),
    pa.field("found_asr_before", pa.float64()),
    pa.field("found_asr_after", pa.float64()),
    pa.field("robust_accuracy_before", pa.float64()),  # BackdoorBench's R-Acc: triggered non-target images kept in their class
    pa.field("robust_accuracy_after", pa.float64()),
    pa.field("der", pa.float64()),  # BackdoorBench's defense effectiveness rating, in [0, 1] (0.5: no change)
    pa.field("search_seconds", pa.float64()),
    pa.field("retrain_seconds", pa.float64()),
    pa.field("repaired_model", pa.string()),  # where the repaired TorchScript model was written (null: none)
    pa.field("repaired_sha256", pa.string()),
)


def trial_schema(params: list[pa.Field]) -> pa.Schema:
    """One row per sweep trial (``gdm-ray sweep``'s trials.parquet): the trial,
    then one column per swept parameter (named by its dotted config key, typed
    by the config field), then the defense's metrics. ``error`` is set when the
    trial could not run (its metrics are then null)."""
    return _table(
        pa.field("trial_id", pa.string()),
        pa.field("status", pa.string()),  # TERMINATED | ERROR
        pa.field("error", pa.string()),
        *params,
        pa.field("objective", pa.float64()),  # asr_after + acc_drop / 100 (minimised)
        pa.field("asr_after", pa.float64()),  # ASR of the real trigger after the defense (eval split)
        pa.field("acc_drop", pa.float64()),  # clean accuracy lost by the defense, percentage points
        pa.field("found_asr_after", pa.float64()),  # ASR of the found triggers after the defense
        pa.field("asr_before", pa.float64()),
        pa.field("acc_before", pa.float64()),
        pa.field("acc_after", pa.float64()),
        pa.field("found_asr_before", pa.float64()),
        pa.field("seconds", pa.float64()),  # the whole trial
        pa.field("search_seconds", pa.float64()),
        pa.field("retrain_seconds", pa.float64()),
        pa.field("finished_at", pa.float64()),  # unix time of the trial's result
        pa.field("node_ip", pa.string()),
        pa.field("seed", pa.int64()),
    )
