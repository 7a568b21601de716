"""The scan tables' rows (DESIGN.md section 3, "Results"), shaped from the
scan workflow's typed results: one verdict row per model
(``VERDICT_SCHEMA``), one class row per (model, class) (``CLASS_SCHEMA``),
and the row of a model that could not be scanned. Every row carries the
config hash and code version that made it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gdm_ray.core.scan_workflow import ModelScan

__all__ = ["Provenance", "verdict_row", "class_rows", "failed_row", "examples_note"]


@dataclass(frozen=True)
class Provenance:
    """What made a row: the config hash and the code version."""

    config_hash: str
    code_version: str

    def fields(self) -> dict[str, str]:
        return {"config_hash": self.config_hash, "code_version": self.code_version}


def verdict_row(
    scan: ModelScan,
    method: str,
    reference: str,
    provenance: Provenance,
    seconds: float | None = None,
    examples: str | None = None,
) -> dict[str, Any]:
    """The model's verdict; ``seconds`` defaults to the scan's summed job time;
    ``examples`` says which clean images it was scanned on (zoo-scan: see
    ``examples_note``). A scan that failed gives its ``failed_row``."""
    if scan.error is not None or scan.result is None:
        return failed_row(scan.model_id, scan.path, scan.sha256, scan.error or "not scanned", method, provenance, examples)
    r = scan.result
    return {
        "model_id": scan.model_id,
        "model_path": scan.path,
        "model_sha256": scan.sha256,
        "error": None,
        "backdoored": r.backdoored,
        "score": r.score,
        "target_class": r.flagged[0] if r.flagged else None,
        "flagged": list(r.flagged),
        "method": method,
        "reference": reference,
        "seconds": scan.seconds if seconds is None else seconds,
        "examples": examples,
        **provenance.fields(),
    }


def class_rows(scan: ModelScan, names: list[str], provenance: Provenance) -> list[dict[str, Any]]:
    """One row per class of a scanned model (none for a failed one): its
    smallest trigger, the anomaly the verdict uses and the one within the model."""
    r = scan.result
    if scan.error is not None or r is None:
        return []
    within = scan.within if scan.within is not None else r.anomaly
    return [
        {
            "model_id": scan.model_id,
            "class": c.target,
            "class_name": names[c.target],
            "trigger_size": c.size,
            "trigger_asr": c.asr,
            "valid": c.valid,
            "anomaly": r.anomaly[i],
            "anomaly_in_model": within[i],
            "flagged": c.target in r.flagged,
            **provenance.fields(),
        }
        for i, c in enumerate(r.classes)
    ]


def failed_row(
    model_id: str, path: str, sha256: str | None, error: str, method: str, provenance: Provenance, examples: str | None = None
) -> dict[str, Any]:
    """The verdict row of a model that could not be loaded or scanned: its error, no verdict."""
    return {
        "model_id": model_id,
        "model_path": path,
        "model_sha256": sha256,
        "error": error,
        "backdoored": None,
        "score": None,
        "target_class": None,
        "flagged": [],
        "method": method,
        "reference": None,
        "seconds": None,
        "examples": examples,
        **provenance.fields(),
    }


def examples_note(own: int | None, why_shared: str | None = None) -> str:
    """The verdict row's ``examples``: ``own:N`` (scanned on its own N example
    images) or ``shared`` (the data= set), with why when it had examples of its own."""
    if own is not None:
        return f"own:{own}"
    return f"shared ({why_shared})" if why_shared else "shared"
