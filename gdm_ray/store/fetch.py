"""Inputs that may live on S3 (a model, a zoo folder, an ensemble) as local files.

Commands read models and ensembles from local paths; an ``s3://`` URI is
downloaded first into a per-user cache (``$GDM_RAY_CACHE`` or
``~/.cache/gdm-ray``) mirroring bucket and key, each file written to a temp
name and renamed, so two runs fetching the same object never see half of it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gdm_ray.store.s3 import S3, StoreError, is_s3, split_s3

__all__ = ["localize", "cache_root"]


def cache_root() -> Path:
    env = os.environ.get("GDM_RAY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "gdm-ray"


def localize(uri: str | Path, store: Mapping[str, Any] | None = None, what: str = "path") -> Path:
    """A local path for ``uri``: itself when local; for s3:// the object, or
    every object under the prefix, downloaded into the cache.

    ``what`` names the config key in errors (``model``, ``zoo.path`` ...).
    """
    if not is_s3(str(uri)):
        return Path(uri)
    uri = str(uri).rstrip("/")
    bucket, key = split_s3(uri)
    s3 = S3(store)
    dest = cache_root() / "s3" / bucket / key
    objects = s3.list(uri) if key else s3.list(f"s3://{bucket}")
    if objects:  # a prefix: mirror it (objects deleted on S3 since are dropped from the mirror)
        keep = set()
        for obj in objects:
            rel = obj[len(uri) + 1 :] if key else obj[len(f"s3://{bucket}/") :]
            keep.add(s3.download(obj, dest / rel))
        for stale in [p for p in dest.rglob("*") if p.is_file() and p not in keep]:
            stale.unlink(missing_ok=True)
        return dest
    if key and s3.exists(uri):
        return s3.download(uri, dest)
    raise StoreError(f"{what}={uri}: nothing there (no object and no objects under that prefix)")
