"""Where results and artifacts go: run folders and Parquet tables written atomically, provenance."""

from gdm_ray.store.dataset import PendingDataset, read_dataset
from gdm_ray.store.parquet import SCHEMA_VERSION, read_rows, write_rows
from gdm_ray.store.provenance import code_version, config_hash
from gdm_ray.store.rundir import RunDir, write_json
from gdm_ray.store.tables import CLASS_SCHEMA, REPAIR_SCHEMA, VERDICT_SCHEMA, trial_schema

__all__ = [
    "CLASS_SCHEMA",
    "REPAIR_SCHEMA",
    "VERDICT_SCHEMA",
    "PendingDataset",
    "RunDir",
    "SCHEMA_VERSION",
    "code_version",
    "config_hash",
    "read_dataset",
    "read_rows",
    "trial_schema",
    "write_json",
    "write_rows",
]
