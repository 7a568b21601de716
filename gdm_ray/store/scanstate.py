"""Finished first-pass chunks on local disk, so an interrupted scan resumes.

A scan (or zoo-scan) run with an explicit ``out=`` keeps each finished chunk
of classes in a state folder (:meth:`RunDir.state_dir`) until its outputs are published;
run again with the same ``out=``, it loads those chunks instead of searching
them again. Tensors go to safetensors with the numbers in its metadata:
nothing here is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from gdm_ray.core.first_pass import ClassTrigger, ScanConfig, ScanPlan

__all__ = ["ScanState"]


class ScanState:
    """Finished first-pass chunks on local disk, so an interrupted scan resumes.

    A chunk's key hashes everything its answer depends on: the model file,
    the first-pass settings, the plan (seed, images, classes of the chunk).
    Files are written to a temp name and renamed: a kill never leaves half a
    result that a resumed run would trust.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.resumed = 0  # chunks loaded instead of searched

    @staticmethod
    def key(model_id: str, sha256: str, cfg: ScanConfig, plan: ScanPlan, chunk: int) -> str:
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("threshold", "moving_window", "window", "stride")}
        h = hashlib.sha256(json.dumps([sha256, settings, plan.seed, plan.chunks[chunk], chunk], sort_keys=True).encode())
        h.update(plan.eval_idx.numpy().tobytes())
        return f"{model_id.replace('/', '--')}-{h.hexdigest()[:24]}"  # a nested zoo's ids hold slashes: one flat folder

    def clear(self) -> None:
        """The run is published: nothing left to resume."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def load(self, key: str) -> list[ClassTrigger] | None:
        if self.folder is None or not (self.folder / f"{key}.safetensors").is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.folder / f"{key}.safetensors"), framework="pt") as f:
                meta = json.loads(f.metadata()["classes"])
                found = [
                    ClassTrigger(
                        int(c["target"]),
                        f.get_tensor(f"pattern_{i}"),
                        f.get_tensor(f"mask_{i}"),
                        float(c["size"]),
                        float(c["asr"]),
                        bool(c["valid"]),
                    )
                    for i, c in enumerate(meta)
                ]
        except Exception:  # unreadable state is searched again, never trusted
            return None
        self.resumed += 1
        return found

    def save(self, key: str, found: list[ClassTrigger]) -> None:
        if self.folder is None:
            return
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, c in enumerate(found):
            tensors[f"pattern_{i}"], tensors[f"mask_{i}"] = c.pattern.contiguous(), c.mask.contiguous()
        meta = [{"target": c.target, "size": c.size, "asr": c.asr, "valid": c.valid} for c in found]
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"classes": json.dumps(meta)})
            os.replace(tmp, self.folder / f"{key}.safetensors")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
