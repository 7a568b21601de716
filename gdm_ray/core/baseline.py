"""Pixel-space reverse engineering of one trigger: the baseline MESA is
compared against (Wang et al., "Neural Cleanse: Identifying and Mitigating
Backdoor Attacks in Neural Networks", IEEE S&P 2019).

SGD on the trigger's pixels (and, optionally, its mask with an L1
penalty on the mask, as Neural Cleanse does) so that images carrying it go
to the target class. It finds one point of the valid-trigger distribution;
restarts from several random inits keep the best one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gdm_ray.core.data import ImageSet
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.train import frozen, model_device
from gdm_ray.core.triggers import apply_trigger, random_positions

__all__ = ["BaselineConfig", "BaselineResult", "PixelBaseline", "save_trigger", "load_trigger"]


@dataclass
class BaselineConfig:
    """Settings of the pixel-space search (Neural Cleanse defaults where it has them)."""

    trigger_size: list[int] = field(default_factory=lambda: [3, 3])
    with_mask: bool = False  # also search the mask (L1-penalised)
    mask_l1: float = 1e-3  # weight of the mask's L1 norm (Neural Cleanse's lambda)
    steps: int = 300
    batch_size: int = 128
    lr: float = 0.1
    restarts: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        self.trigger_size = [int(s) for s in self.trigger_size]
        if len(self.trigger_size) != 2 or min(self.trigger_size) < 1:
            raise ConfigError(f"baseline.trigger_size={self.trigger_size} must be two positive integers [h, w]")
        for key in ("steps", "batch_size", "restarts"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"baseline.{key}={getattr(self, key)} must be >= 1")
        if float(self.lr) <= 0:
            raise ConfigError(f"baseline.lr={self.lr} must be > 0")
        if float(self.mask_l1) < 0:
            raise ConfigError(f"baseline.mask_l1={self.mask_l1} must be >= 0")


@dataclass
class BaselineResult:
    pattern: torch.Tensor  # C x h x w in [0, 1]
    mask: torch.Tensor  # h x w in [0, 1]
    asr: float  # on the search data, random placement
    restart_asr: list[float]
    target: int


class PixelBaseline:
    """Reverse-engineer one trigger for ``target`` by pixel-space SGD.

    Shape: images in [0, 1], N x C x H x W; the found pattern is C x h x w and
    the mask h x w (all ones unless ``with_mask``).

    Example:
        >>> search = PixelBaseline(BaselineConfig(trigger_size=[3, 3]))
        >>> found = search.fit(model, splits.defense, target=0, rng=torch.Generator().manual_seed(0))
        >>> patterns, masks = search.sample(64)
    """

    def __init__(self, cfg: BaselineConfig | None = None) -> None:
        self.cfg = cfg or BaselineConfig()
        self.result: BaselineResult | None = None

    def fit(
        self,
        model: nn.Module,
        data: ImageSet,
        target: int,
        rng: torch.Generator,
        progress: Callable[[int, int, float], None] | None = None,
    ) -> BaselineResult:
        cfg = self.cfg
        c, H, W = data.shape
        h, w = cfg.trigger_size
        if h > H or w > W:
            raise ConfigError(f"baseline.trigger_size={h}x{w} is larger than the image {H}x{W}")
        if not 0 <= int(target) < data.num_classes:
            raise ConfigError(f"target_class={target} is not a class of the data (0..{data.num_classes - 1})")
        pool = data.x[data.y != int(target)]
        if len(pool) == 0:
            raise ConfigError(f"the search data holds no images outside target class {target}")
        device = model_device(model)
        total = cfg.restarts * cfg.steps
        best: tuple[float, torch.Tensor, torch.Tensor] | None = None
        restart_asr = []
        labels = torch.full((cfg.batch_size,), int(target), device=device)
        with frozen(model):
            for r in range(cfg.restarts):
                p_logit = (torch.randn(c, h, w, generator=rng) * 2).to(device).requires_grad_(True)
                m_logit = torch.full((h, w), 3.0, device=device, requires_grad=cfg.with_mask)
                opt = torch.optim.Adam([p_logit, m_logit] if cfg.with_mask else [p_logit], lr=cfg.lr)
                for step in range(cfg.steps):
                    idx = torch.randint(0, len(pool), (cfg.batch_size,), generator=rng)
                    x = pool[idx].to(device)
                    pos = random_positions(len(x), (h, w), (H, W), rng)
                    mask = torch.sigmoid(m_logit)
                    logits = model(apply_trigger(x, torch.sigmoid(p_logit), mask, pos))
                    loss = nn.functional.cross_entropy(logits, labels[: len(x)])
                    if cfg.with_mask:
                        loss = loss + cfg.mask_l1 * mask.sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if progress is not None:
                        progress(r * cfg.steps + step + 1, total, float(loss.detach()))
                pattern = torch.sigmoid(p_logit).detach()
                mask = torch.sigmoid(m_logit).detach() if cfg.with_mask else torch.ones(h, w, device=device)
                asr = _asr(model, pool, pattern, mask, int(target), rng)
                restart_asr.append(asr)
                if best is None or asr > best[0]:
                    best = (asr, pattern, mask)
        assert best is not None
        self.result = BaselineResult(best[1].cpu(), best[2].cpu(), best[0], restart_asr, int(target))
        return self.result

    @classmethod
    def from_result(cls, result: BaselineResult) -> PixelBaseline:
        """A finished search's sampler, e.g. from ``load_trigger``: retrain against it again."""
        base = cls()
        base.result = result
        return base

    def sample(self, n: int, rng: torch.Generator | None = None, level: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n copies of the one trigger found (a point distribution)."""
        if self.result is None:
            raise RuntimeError("PixelBaseline.sample called before fit")
        r = self.result
        return r.pattern.unsqueeze(0).expand(n, -1, -1, -1), r.mask.unsqueeze(0).expand(n, -1, -1)


@torch.no_grad()
def _asr(model: nn.Module, pool: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor, target: int, rng: torch.Generator) -> float:
    device = model_device(model)
    hits = 0
    for i in range(0, len(pool), 512):
        x = pool[i : i + 512].to(device)
        pos = random_positions(len(x), tuple(mask.shape), tuple(x.shape[2:]), rng)
        hits += int((model(apply_trigger(x, pattern, mask, pos)).argmax(1) == target).sum())
    return hits / len(pool)


def save_trigger(result: BaselineResult, path: str | Path) -> None:
    """The found trigger as safetensors (pattern C x h x w, mask h x w); target
    and search ASR ride in the header's metadata."""
    from safetensors.torch import save_file

    meta = {"target": str(result.target), "asr": repr(float(result.asr)), "restart_asr": json.dumps(result.restart_asr)}
    save_file({"pattern": result.pattern.contiguous(), "mask": result.mask.contiguous()}, str(path), metadata=meta)


def load_trigger(path: str | Path, target: int | None = None) -> BaselineResult:
    """Read a trigger written by ``save_trigger`` (no pickle), checking shapes and
    range. ``target`` is needed only for files written before the metadata
    held it; a value that contradicts the file is refused."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"trigger={path}: not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None
    pattern, mask = tensors.get("pattern"), tensors.get("mask", tensors.get("alpha"))  # "alpha": files written before the rename
    if pattern is None or mask is None or pattern.dim() != 3 or tuple(mask.shape) != tuple(pattern.shape[1:]):
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        raise ConfigError(f"trigger={path}: expected pattern C x h x w and mask h x w, found {shapes}")
    if (
        not (pattern.is_floating_point() and mask.is_floating_point())
        or min(pattern.min(), mask.min()) < 0
        or max(pattern.max(), mask.max()) > 1
    ):
        raise ConfigError(f"trigger={path}: pattern and mask must be floats in [0, 1]")
    stored = int(meta["target"]) if "target" in meta else None
    if stored is None and target is None:
        raise ConfigError(f"trigger={path}: the file does not name its target class; pass target")
    if stored is not None and target is not None and stored != int(target):
        raise ConfigError(f"trigger={path}: found for class {stored}, not target={target}")
    asr = float(meta.get("asr", "nan"))
    restarts = [float(a) for a in json.loads(meta.get("restart_asr", "[]"))]
    return BaselineResult(pattern.float(), mask.float(), asr, restarts, stored if stored is not None else int(target))
