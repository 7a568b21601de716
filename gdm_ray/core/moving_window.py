"""Moving-window detection (the CSAW HackML extension): where does a
fixed-location trigger live?

A trigger trained at one place works only there. The search confines a
first-pass style trigger (batched Neural Cleanse, ``first_pass.search_chunk``)
to a window placed at a grid of corners, scores each window by its found
trigger's strength, and accumulates the strengths per pixel into a heat map;
the hot box sizes and places the complete search of the class
(``class_search``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gdm_ray.core.data import ImageSet
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.first_pass import ScanConfig, mask_asr, search_chunk, split_images
from gdm_ray.core.train import frozen, model_device

__all__ = ["default_window", "HeatMap", "WindowPlan", "plan_windows", "WindowFind", "search_windows", "window_result", "window_heatmap"]


def default_window(image_hw: tuple[int, int]) -> tuple[int, int]:
    """The CSAW HackML window, 15x15 on 55x47 faces, scaled to the image."""
    H, W = image_hw
    return max(1, min(H, round(15 * H / 55))), max(1, min(W, round(15 * W / 47)))


@dataclass
class HeatMap:
    """Where a fixed-location trigger for ``target`` lives.

    ``strength[j]`` is window j's found-trigger strength (held-out ASR of its
    smallest working mask times the share of the window it leaves untouched,
    so a small mask that flips everything scores near 1); ``heat`` averages
    the strengths of the windows covering each pixel; ``box`` (row, col, h, w)
    bounds the pixels at >= half the peak heat, the size and location
    indicator for the complete search.
    """

    target: int
    heat: torch.Tensor  # H x W
    windows: list[tuple[int, int]]  # top-left corners
    window: tuple[int, int]
    strength: list[float]
    asr: list[float]
    size: list[float]
    peak: tuple[int, int]
    box: tuple[int, int, int, int]
    patterns: torch.Tensor  # windows x C x H x W
    masks: torch.Tensor  # windows x H x W
    seconds: float
    passes: int


@dataclass
class WindowPlan:
    """How a moving-window search splits its work (like ``ScanPlan``): the
    window's corners, searched ``classes_per_pass`` at a time, chunk i with
    seed + i, so chunks can run anywhere (gdm_ray.distributed: as Ray tasks)."""

    target: int
    window: tuple[int, int]
    image: tuple[int, int]
    corners: list[tuple[int, int]]
    chunks: list[list[int]]  # indices into corners
    eval_idx: torch.Tensor
    search_idx: torch.Tensor
    seed: int

    def regions(self, which: list[int] | None = None) -> torch.Tensor:
        """One {0,1} mask per corner (``which``: indices; default all)."""
        (H, W), (wh, ww) = self.image, self.window
        idx = range(len(self.corners)) if which is None else which
        out = torch.zeros(len(idx), H, W)
        for j, i in enumerate(idx):
            r, c = self.corners[i]
            out[j, r : r + wh, c : c + ww] = 1
        return out


def plan_windows(
    data: ImageSet,
    target: int,
    cfg: ScanConfig | None = None,
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    rng: torch.Generator | None = None,
) -> WindowPlan:
    """Place the windows of a moving-window search (see ``window_heatmap``)."""
    cfg = cfg or ScanConfig()
    rng = rng if rng is not None else torch.Generator().manual_seed(0)
    _, H, W = data.shape
    wh, ww = window if window is not None else default_window((H, W))
    if wh > H or ww > W or min(wh, ww) < 1:
        raise ConfigError(f"scan.window={wh}x{ww} does not fit the image {H}x{W}")
    sh, sw = stride if stride is not None else (max(1, wh // 2), max(1, ww // 2))
    if min(sh, sw) < 1:
        raise ConfigError(f"scan.stride={sh}x{sw} must be positive")
    if not 0 <= int(target) < data.num_classes:
        raise ConfigError(f"target_class={target} is not a class of the data (0..{data.num_classes - 1})")
    rows = sorted(set(list(range(0, H - wh + 1, sh)) + [H - wh]))
    cols = sorted(set(list(range(0, W - ww + 1, sw)) + [W - ww]))
    corners = [(r, c) for r in rows for c in cols]
    eval_idx, search_idx = split_images(data, cfg, rng)
    per = int(cfg.classes_per_pass)
    chunks = [list(range(i, min(i + per, len(corners)))) for i in range(0, len(corners), per)]
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    return WindowPlan(int(target), (wh, ww), (H, W), corners, chunks, eval_idx, search_idx, seed)


WindowFind = tuple[torch.Tensor, torch.Tensor, float, float]  # pattern, mask, held-out ASR, mask size


def search_windows(
    model: nn.Module,
    data: ImageSet,
    cfg: ScanConfig,
    plan: WindowPlan,
    which: list[int] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[int, WindowFind]:
    """Search the chunks ``which`` of a window plan; corner index -> what it found."""
    which = list(range(len(plan.chunks))) if which is None else list(which)
    device = model_device(model)
    x_tr, y_tr = data.x[plan.search_idx].to(device), data.y[plan.search_idx].to(device)
    x_ev, y_ev = data.x[plan.eval_idx].to(device), data.y[plan.eval_idx].to(device)
    total = len(which) * int(cfg.steps)
    out: dict[int, WindowFind] = {}
    with frozen(model):
        for n, i in enumerate(which):
            idx = plan.chunks[i]
            rng = torch.Generator().manual_seed(plan.seed + i)
            found = search_chunk(
                model, x_tr, y_tr, [plan.target] * len(idx), plan.regions(idx).to(device), cfg, rng, progress, n * int(cfg.steps), total
            )
            for j, (p, m) in zip(idx, found):
                out[j] = (p.cpu(), m.cpu(), mask_asr(model, x_ev, y_ev, plan.target, p, m), float(m.sum()))
    return out


def window_result(plan: WindowPlan, found: dict[int, WindowFind], cfg: ScanConfig, seconds: float) -> HeatMap:
    """The heat map from every window's find: each pixel averages the
    strengths of the windows covering it; the hot box bounds >= half the peak."""
    if sorted(found) != list(range(len(plan.corners))):
        raise ValueError(f"window_result: finds for {len(found)} of {len(plan.corners)} windows")
    (_, W), (wh, ww) = plan.image, plan.window
    pats, masks, asr, size = ([found[j][f] for j in range(len(plan.corners))] for f in range(4))
    area = float(wh * ww)
    strength = [a * max(0.0, 1.0 - s / area) for a, s in zip(asr, size)]
    regions = plan.regions()
    cover = regions.sum(0).clamp_min(1)
    heat = (regions * torch.tensor(strength)[:, None, None]).sum(0) / cover
    flat = int(heat.flatten().argmax())
    peak = (flat // W, flat % W)
    hot = (heat >= 0.5 * heat.max()).nonzero() if float(heat.max()) > 0 else torch.tensor([[peak[0], peak[1]]])
    r0, c0 = (int(v) for v in hot.min(0).values)
    r1, c1 = (int(v) for v in hot.max(0).values)
    return HeatMap(
        plan.target,
        heat,
        plan.corners,
        (wh, ww),
        strength,
        asr,
        size,
        peak,
        (r0, c0, r1 - r0 + 1, c1 - c0 + 1),
        torch.stack(pats),
        torch.stack(masks),
        seconds,
        len(plan.chunks) * int(cfg.steps),
    )


def window_heatmap(
    model: nn.Module,
    data: ImageSet,
    target: int,
    cfg: ScanConfig | None = None,
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    rng: torch.Generator | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> HeatMap:
    """Search a trigger for ``target`` confined to a window at a grid of places.

    Windows train ``cfg.classes_per_pass`` at a time, one classifier pass per
    step (the same batched Neural Cleanse as the class scan, each slot's mask
    confined to its window).
    """
    cfg = cfg or ScanConfig()
    t0 = time.perf_counter()
    plan = plan_windows(data, target, cfg, window, stride, rng)
    return window_result(plan, search_windows(model, data, cfg, plan, progress=progress), cfg, time.perf_counter() - t0)
