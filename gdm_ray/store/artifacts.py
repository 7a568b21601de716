"""Finished ensembles on local disk or S3 (DESIGN.md section 3, "Artifacts").

An ensemble on S3 is a prefix holding the same two objects as the local
directory (``manifest.json``, ``generators.safetensors``); it is fetched and
then loaded by :func:`gdm_ray.core.ensemble.load_ensemble`, which checks the
weights' sha256 against the manifest, so a corrupt or swapped object is
refused wherever it lives.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gdm_ray.core.ensemble import MANIFEST, Ensemble, EnsembleError, load_ensemble
from gdm_ray.store.fetch import cache_root
from gdm_ray.store.s3 import S3, is_s3, join_uri, split_s3

__all__ = ["open_ensemble", "publish_ensemble"]


def open_ensemble(uri: str | Path, store: Mapping[str, Any] | None = None, device: str | torch.device = "cpu") -> Ensemble:
    """Load and verify the ensemble at a local directory or an s3:// prefix."""
    if not is_s3(str(uri)):
        return load_ensemble(uri, device=device)
    import json

    uri = str(uri).rstrip("/")
    bucket, key = split_s3(uri)
    s3 = S3(store)
    dest = cache_root() / "ensembles" / bucket / key
    if not s3.exists(join_uri(uri, MANIFEST)):
        raise EnsembleError(f"ensemble={uri}: no {MANIFEST} (not an ensemble prefix)")
    s3.download(join_uri(uri, MANIFEST), dest / MANIFEST)
    try:
        weights = str(json.loads((dest / MANIFEST).read_text()).get("weights_file", "generators.safetensors"))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise EnsembleError(f"ensemble={uri}: {MANIFEST} is not valid JSON ({exc})") from None
    if "/" in weights or weights.startswith("."):
        raise EnsembleError(f"ensemble={uri}: weights_file {weights!r} must be a plain file name")
    if s3.exists(join_uri(uri, weights)):
        s3.download(join_uri(uri, weights), dest / weights)
    else:
        (dest / weights).unlink(missing_ok=True)
    try:
        return load_ensemble(dest, device=device)
    except EnsembleError as exc:  # name the URI the user gave, not the cache
        raise EnsembleError(str(exc).replace(str(dest), uri)) from None


def publish_ensemble(local_dir: str | Path, uri: str, store: Mapping[str, Any] | None = None) -> str:
    """Copy a saved ensemble directory to ``uri`` (local or s3://): weights
    first, manifest last, so a reader that finds the manifest finds the
    weights it names."""
    src = Path(local_dir)
    load_ensemble(src)  # never publish a broken artifact
    if not is_s3(uri):
        import shutil

        dest = Path(uri)
        if dest.resolve() != src.resolve():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        return str(dest)
    s3 = S3(store)
    files = sorted(src.iterdir(), key=lambda p: p.name == MANIFEST)
    for f in files:
        if f.is_file():
            s3.put_file(join_uri(uri, f.name), f)
    return uri
