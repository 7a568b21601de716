"""A finished MESA ensemble as an artifact (DESIGN.md section 3, "Artifacts").

A directory with ``generators.safetensors`` (the staircase's weights) and
``manifest.json`` (trigger shape, N, betas, alpha, ensemble weights, target
class, source model hash, and the sha256 of the weights file). Loading
checks the hash, so a corrupted or swapped weights file is refused rather
than sampled from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gdm_ray.core.errors import GdmRayError
from gdm_ray.core.generator import StaircaseGenerators
from gdm_ray.core.mesa import MESA, MESAConfig, MESAResult

__all__ = ["Ensemble", "EnsembleError", "save_ensemble", "load_ensemble", "MANIFEST", "WEIGHTS"]

MANIFEST = "manifest.json"
WEIGHTS = "generators.safetensors"
FORMAT = "gdm-ray-ensemble/1"


class EnsembleError(GdmRayError, ValueError):
    """An ensemble artifact is missing, corrupt or inconsistent."""


@dataclass
class Ensemble:
    """A loaded ensemble: sample triggers, read the manifest."""

    mesa: MESA
    manifest: dict[str, Any]

    def sample(self, n: int, rng: torch.Generator | None = None, level: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mesa.sample(n, rng=rng, level=level)

    @property
    def position(self) -> tuple[int, int] | None:
        """Fixed top-left place of the triggers (a moving-window search), None = anywhere."""
        return self.mesa.position

    @property
    def target_class(self) -> int:
        return int(self.manifest["target_class"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_ensemble(
    mesa: MESA, result: MESAResult, path: str | Path, source_model_sha256: str | None = None, extra: dict[str, Any] | None = None
) -> Path:
    """Write the artifact directory atomically (staged, then renamed into place)."""
    from safetensors.torch import save_file

    if mesa.generators is None or mesa.weights is None:
        raise EnsembleError("save_ensemble needs a fitted MESA")
    gens = mesa.generators
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-"))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in gens.state_dict().items()}
        save_file(state, str(stage / WEIGHTS))
        manifest = {
            "format": FORMAT,
            "trigger_shape": [gens.channels, *gens.trigger_size],
            "with_mask": gens.with_mask,
            "levels": gens.levels,
            "betas": list(result.betas),
            "alpha": result.alpha,
            "weights": [float(w) for w in mesa.weights],
            "entropy": list(result.entropy),
            "asr": list(result.asr),
            "extent": result.extent,
            "restarted": list(result.restarted),
            "target_class": int(result.target),
            "source_model_sha256": source_model_sha256,
            "generator": {"levels": gens.levels, **gens._arch()},
            "mesa_config": result.config,
            "weights_file": WEIGHTS,
            "weights_sha256": _sha256(stage / WEIGHTS),
            **(extra or {}),
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=list) + "\n")
        for f in stage.iterdir():
            os.chmod(f, 0o644)
        if final.exists():
            shutil.rmtree(final)
        os.replace(stage, final)
        os.chmod(final, 0o755)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return final


def load_ensemble(path: str | Path, device: str | torch.device = "cpu") -> Ensemble:
    """Load and verify an ensemble directory; raises EnsembleError naming the problem."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path)
    mf = root / MANIFEST
    if not mf.is_file():
        raise EnsembleError(f"ensemble={root}: no {MANIFEST} (not an ensemble directory)")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EnsembleError(f"ensemble={root}: {MANIFEST} is not valid JSON ({exc})") from None
    _upgrade(manifest)
    if manifest.get("format") != FORMAT:
        raise EnsembleError(f"ensemble={root}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    wf = root / str(manifest.get("weights_file", WEIGHTS))
    if not wf.is_file():
        raise EnsembleError(f"ensemble={root}: weights file {wf.name} is missing")
    if _sha256(wf) != manifest.get("weights_sha256"):
        raise EnsembleError(f"ensemble={root}: {wf.name} does not match the sha256 in the manifest (corrupt or replaced)")
    try:
        state = load_file(str(wf), device="cpu")
        arch = dict(manifest["generator"])
        gens = StaircaseGenerators(**arch)
        gens.load_state_dict(state, strict=True)
        weights = torch.tensor([float(w) for w in manifest["weights"]])
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise EnsembleError(f"ensemble={root}: inconsistent artifact ({str(exc).splitlines()[0][:200]})") from None
    if len(weights) != gens.levels or abs(float(weights.sum()) - 1.0) > 1e-4:
        raise EnsembleError(f"ensemble={root}: weights {manifest['weights']} do not fit {gens.levels} levels")
    cfg = MESAConfig(**manifest["mesa_config"]) if isinstance(manifest.get("mesa_config"), dict) else MESAConfig()
    mesa = MESA(cfg)
    mesa.generators = gens.to(device).eval()
    mesa.weights = weights
    return Ensemble(mesa, manifest)


def _upgrade(manifest: dict) -> None:
    """Manifests written before the trigger's transparency was named mask call it with_alpha."""
    for node in (manifest, manifest.get("generator"), manifest.get("mesa_config")):
        if isinstance(node, dict) and "with_alpha" in node:
            node["with_mask"] = node.pop("with_alpha")
