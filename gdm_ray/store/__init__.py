"""Where results and artifacts go: run folders written atomically, provenance."""

from gdm_ray.store.provenance import code_version, config_hash
from gdm_ray.store.rundir import RunDir, write_json

__all__ = ["RunDir", "code_version", "config_hash", "write_json"]
