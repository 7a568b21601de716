"""The complete search of one flagged class: the moving window (where its
trigger lives, when asked), then MESA (the distribution of its valid
triggers), placed and sized by the heat map when there is one.

A class search is seeded by one integer: the windows draw from
``window_seed(seed)`` and MESA from ``mesa_seed(seed)``, so it gives the same
answer in whatever process or order it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gdm_ray.core.data import ImageSet
from gdm_ray.core.first_pass import ScanConfig
from gdm_ray.core.mesa import MESA, MESAConfig, MESAResult
from gdm_ray.core.metrics import sampled_asr
from gdm_ray.core.moving_window import HeatMap, window_heatmap

__all__ = ["ClassSearch", "Bar", "class_mesa", "window_seed", "mesa_seed", "search_class"]


@dataclass
class ClassSearch:
    """What the full search of one flagged class found: where its trigger
    lives (moving window) and the distribution of its triggers (MESA)."""

    heat: HeatMap | None
    mesa: MESA | None
    result: MESAResult | None
    asr_eval: float | None  # the ensemble's samples on held-out images


Bar = Callable[[str], tuple[Callable[[int, int, float], None] | None, Callable[[], None]]]


def class_mesa(
    model: nn.Module,
    data: ImageSet,
    eval_data: ImageSet,
    k: int,
    mesa_cfg: MESAConfig,
    heat: HeatMap | None,
    seed: int,
    eval_seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    first_pass: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[MESA, MESAResult, float]:
    """MESA on flagged class k, placed and sized by the heat map when there is
    one, else (without ``mesa.trigger_size``) by the class's ``first_pass``
    (pattern, mask); returns the fitted MESA, its result and its samples'
    held-out ASR."""
    if heat is not None:  # the heat map sizes and places the complete search
        r0, c0, h, w = heat.box
        mesa_cfg = dataclasses.replace(mesa_cfg, trigger_size=[h, w], position=[r0, c0], with_mask=True)
    mesa = MESA(mesa_cfg)
    res = mesa.fit(model, data, k, torch.Generator().manual_seed(seed), progress, first_pass)
    return mesa, res, sampled_asr(model, eval_data, mesa, k, torch.Generator().manual_seed(eval_seed))


def window_seed(seed: int) -> int:
    """A class search's seed for its windows (MESA: ``mesa_seed``)."""
    return 2 * seed % 2**63


def mesa_seed(seed: int) -> int:
    return (2 * seed + 1) % 2**63


def search_class(
    model: nn.Module,
    data: ImageSet,
    eval_data: ImageSet,
    k: int,
    cfg: ScanConfig,
    mesa_cfg: MESAConfig | None,
    seed: int,
    window: bool,
    eval_seed: int = 0,
    bar: Bar | None = None,
    first_pass: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ClassSearch:
    """The complete search of flagged class k: the moving window (``window``),
    then MESA (unless ``mesa_cfg`` is None), placed and sized by the heat map
    when there is one. Seeded by ``seed`` alone, so it gives the same answer
    wherever it runs. ``bar(desc)`` makes a progress callback and its closer."""
    bar = bar or (lambda desc: (None, lambda: None))
    heat: HeatMap | None = None
    if window:
        update, close = bar(f"moving window, class {k}")
        try:
            heat = window_heatmap(
                model,
                data,
                k,
                cfg,
                tuple(cfg.window) if cfg.window else None,
                tuple(cfg.stride) if cfg.stride else None,
                torch.Generator().manual_seed(window_seed(seed)),
                update,
            )
        finally:
            close()
    if mesa_cfg is None:
        return ClassSearch(heat, None, None, None)
    update, close = bar(f"MESA, class {k}")
    try:
        mesa, res, asr = class_mesa(model, data, eval_data, k, mesa_cfg, heat, mesa_seed(seed), eval_seed, update, first_pass)
    finally:
        close()
    return ClassSearch(heat, mesa, res, asr)
