"""The row a repair adds to repair.parquet (gdm_ray.store.tables.REPAIR_SCHEMA)."""

from __future__ import annotations

from typing import Any

__all__ = ["repair_row"]


def repair_row(metrics: dict[str, Any], model_id: str, model_uri: str) -> dict[str, Any]:
    """defend's metrics.json as one row; ``model_uri``: where the repaired model was published."""
    before, after = metrics["before"], metrics["after"] or {}
    return {
        "model_id": model_id,
        "model_path": metrics["model"],
        "model_sha256": metrics["model_sha256"],
        "method": metrics["method"],
        "target_class": str(metrics["target_class"]),
        "targets": [int(t) for t in metrics["targets"]],
        "asr_before": before["asr"],
        "asr_after": after.get("asr"),
        "acc_before": before["clean_accuracy"],
        "acc_after": after.get("clean_accuracy"),
        "found_asr_before": before["found_asr"],
        "found_asr_after": after.get("found_asr"),
        "robust_accuracy_before": before.get("robust_accuracy"),  # metrics.json before R-Acc had none
        "robust_accuracy_after": after.get("robust_accuracy"),
        "der": metrics.get("der"),
        "search_seconds": float(metrics["search"]["search_seconds"]),
        "retrain_seconds": float(metrics["retrain_seconds"]),
        "repaired_model": model_uri if metrics["repaired_sha256"] else None,
        "repaired_sha256": metrics["repaired_sha256"],
        "config_hash": metrics["config_hash"],
        "code_version": metrics["code_version"],
    }
