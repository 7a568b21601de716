"""How large a trigger is, and whether it has a place, estimated from the
model alone (a security team does not know the trigger it is looking for).

MESA models triggers of a fixed extent h x w. A fixed 3x3 square (the
paper's default) fits 3x3 patches only: the generators cannot draw a 6x6
pattern, a 2x7 bar or a blend over the whole image, and the repair then
misses the backdoor. So when ``mesa.trigger_size`` is not given, the extent
comes from the target class's first-pass trigger (``first_pass``: Neural
Cleanse's smallest mask that flips held-out images to the class):

- threshold the mask at ``level`` times its maximum: Neural Cleanse masks
  carry faint mass all over the image;
- take the box of its heaviest blob (``box_of_mask``);
- if that box alone keeps less than ``compact`` of the whole mask's ASR,
  the trigger is not a patch (a blend, a signal over the image): model it
  over the whole image;
- each side grown by a third of itself (at least one pixel) on both ends, at
  least ``min_size``: Neural Cleanse keeps only the part of a trigger the
  model needs, often much less than the whole (a 3x2 box for a 3x3 patch),
  and MESA then learns a transparency mask inside the box (the paper's
  arbitrary-shape extension), so a box too large costs little while one
  too small cannot hold the trigger.

Placement: the found trigger, cut to its box, is applied where it was found
and at random places on held-out images. A backdoor learnt at random places
fires anywhere; one learnt at a fixed place fires only there, so if the
random-place ASR is below ``fixed_ratio`` (a quarter) of the found-place
ASR, the trigger is modelled at that place (MESA's ``position``). A quarter
sits between the two cases: a trigger learnt at one place fires at random
places about as often as a random place lands on it (a few percent on
28x28), one learnt everywhere fires at most places, less only where the
image's own content covers it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.functional import max_pool2d

from gdm_ray.core.data import ImageSet
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.first_pass import ScanConfig, plan_scan, scan_chunks, search_chunk, split_images
from gdm_ray.core.metrics import predict
from gdm_ray.core.train import frozen, model_device
from gdm_ray.core.triggers import apply_trigger, random_positions

__all__ = ["ExtentConfig", "Extent", "box_of_mask", "extent_from_mask", "estimate_extent"]


@dataclass
class ExtentConfig:
    """How a first-pass mask becomes a trigger extent (see the module docstring)."""

    level: float = 0.5  # mask values below level * max are ignored
    compact: float = 0.5  # the boxed trigger must keep this share of the whole mask's ASR, else: the whole image
    min_size: int = 3
    fixed_ratio: float = 0.25  # random-place ASR below this share of found-place ASR => fixed place
    eval_images: int = 500  # held-out images for the placement test

    def __post_init__(self) -> None:
        for key in ("level", "compact", "fixed_ratio"):
            v = float(getattr(self, key))
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"extent.{key}={v} must be in (0, 1]")
        for key in ("min_size", "eval_images"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"extent.{key}={getattr(self, key)} must be >= 1")


@dataclass
class Extent:
    """An estimated trigger extent: what MESA models and where it came from."""

    size: list[int]  # [h, w] MESA models
    position: list[int] | None  # fixed top-left [row, col], or None (random places)
    box: list[int]  # [row, col, h, w] of the mask's main blob, before growing
    mask_l1: float  # the first-pass mask's L1 (pixels)
    asr_whole: float  # the whole first-pass trigger (held-out images)
    asr_found: float  # its box alone, where it was found
    asr_random: float  # its box alone, at random places
    compact: bool = True  # False: the box lost the trigger, which is spread over the image
    source: str = "first_pass"

    def as_dict(self) -> dict:
        return asdict(self)


def box_of_mask(mask: torch.Tensor, level: float = 0.5) -> tuple[int, int, int, int]:
    """[row, col, h, w] of the heaviest blob of the mask above ``level`` x its max.

    Blobs are 8-connected with one-pixel gaps bridged: a Neural Cleanse mask
    of a patch is often a sparse checkerboard of its pixels. A model that
    learnt a trigger at random places may show two partial copies of it; the
    heaviest stands for the trigger, the box of all of them would not."""
    m = mask.detach().float().cpu()
    if m.dim() != 2:
        raise ConfigError(f"box_of_mask needs an H x W mask, got shape {tuple(m.shape)}")
    H, W = m.shape
    peak = float(m.max())
    if peak <= 0:
        return 0, 0, int(H), int(W)
    active = m >= level * peak
    bridged = max_pool2d(active[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
    labels = torch.where(bridged, torch.arange(1, H * W + 1, dtype=torch.float32).view(H, W), torch.zeros(H, W))
    while True:  # every pixel of a blob takes the blob's largest index
        grown = torch.where(bridged, max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0], labels)
        if torch.equal(grown, labels):
            break
        labels = grown
    ids = labels[active]
    weights = m[active]
    heaviest = max(ids.unique().tolist(), key=lambda i: float(weights[ids == i].sum()))
    rows, cols = ((labels == heaviest) & active).nonzero(as_tuple=True)
    r0, c0 = int(rows.min()), int(cols.min())
    return r0, c0, int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1


def _grown(side: int, limit: int, min_size: int) -> int:
    """A box side grown by a third of itself (at least a pixel) on each side."""
    return min(limit, max(min_size, side + 2 * max(1, math.ceil(side / 3))))


def extent_from_mask(
    model: nn.Module,
    data: ImageSet,
    target: int,
    pattern: torch.Tensor,
    mask: torch.Tensor,
    cfg: ExtentConfig | None = None,
    rng: torch.Generator | None = None,
    scan: ScanConfig | None = None,
) -> Extent:
    """The extent and placement of ``target``'s trigger from its first-pass
    trigger (pattern C x H x W, mask H x W, found on full images); ``data``:
    clean images for the refining search and the held-out tests."""
    cfg, scan = cfg or ExtentConfig(), scan or ScanConfig()
    rng = rng if rng is not None else torch.Generator().manual_seed(0)
    _, H, W = data.shape
    if tuple(mask.shape) != (H, W):
        raise ConfigError(f"first-pass mask of shape {tuple(mask.shape)} does not match the images {H}x{W}")
    eval_idx, search_idx = split_images(data, scan, rng)
    held_out, search = data.subset(eval_idx), data.subset(search_idx)
    r0, c0, bh, bw = box_of_mask(mask, cfg.level)
    # search again inside a window around the heaviest blob: the whole trigger where the first pass kept a part of it
    region = _window((r0, c0, bh, bw), (H, W))
    p2, m2 = _search_in(model, search, target, region, scan, rng)
    r0, c0, bh, bw = box_of_mask(m2, cfg.level)
    asr_whole, asr_found, asr_random = _asr_tests(model, held_out, target, pattern, mask, (p2, m2), (r0, c0, bh, bw), cfg, rng)
    if asr_found < float(cfg.compact) * asr_whole:  # no patch does what the whole mask does: a trigger spread over the image
        return Extent([H, W], None, [r0, c0, bh, bw], float(mask.sum()), asr_whole, asr_found, asr_random, compact=False)
    h, w = _grown(bh, H, int(cfg.min_size)), _grown(bw, W, int(cfg.min_size))
    position = None
    if asr_random < float(cfg.fixed_ratio) * asr_found and (h, w) != (H, W):
        # a fixed place: the grown box centred on the found one, inside the image
        position = [min(max(0, r0 - (h - bh) // 2), H - h), min(max(0, c0 - (w - bw) // 2), W - w)]
    return Extent([h, w], position, [r0, c0, bh, bw], float(mask.sum()), asr_whole, asr_found, asr_random)


def _window(box: tuple[int, int, int, int], image_hw: tuple[int, int]) -> torch.Tensor:
    """1 x H x W region: the box with max(3, its side) pixels added on every side."""
    r0, c0, bh, bw = box
    H, W = image_hw
    dr, dc = max(3, bh), max(3, bw)
    region = torch.zeros(1, H, W)
    region[0, max(0, r0 - dr) : min(H, r0 + bh + dr), max(0, c0 - dc) : min(W, c0 + bw + dc)] = 1.0
    return region


def _search_in(
    model: nn.Module, data: ImageSet, target: int, region: torch.Tensor, scan: ScanConfig, rng: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first pass's search for ``target`` with its mask confined to ``region``."""
    device = model_device(model)
    x, y = data.x.to(device), data.y.to(device)
    with frozen(model):
        ((p, m),) = search_chunk(model, x, y, [int(target)], region.to(device), scan, rng, None, 0, int(scan.steps))
    return p.detach().cpu(), m.detach().cpu()


@torch.no_grad()
def _asr_tests(
    model: nn.Module,
    data: ImageSet,
    target: int,
    pattern: torch.Tensor,
    mask: torch.Tensor,
    refined: tuple[torch.Tensor, torch.Tensor],
    box: tuple[int, int, int, int],
    cfg: ExtentConfig,
    rng: torch.Generator,
) -> tuple[float, float, float]:
    """ASR of the whole first-pass trigger, and of the refined trigger's box where it was found and at random places."""
    r0, c0, bh, bw = box
    x = data.x[data.y != int(target)]
    if len(x) == 0:
        return 0.0, 0.0, 0.0
    x = x[torch.randperm(len(x), generator=rng)[: int(cfg.eval_images)]]
    pattern, mask = pattern.detach().cpu().to(x), mask.detach().cpu().to(x)
    n, (H, W) = len(x), tuple(x.shape[-2:])
    found = torch.tensor([[r0, c0]], dtype=torch.long).expand(n, 2)
    spots = random_positions(n, (bh, bw), (H, W), rng)
    pat, msk = refined[0].to(x)[:, r0 : r0 + bh, c0 : c0 + bw], refined[1].to(x)[r0 : r0 + bh, c0 : c0 + bw]
    cases = [(pattern, mask, torch.zeros(n, 2, dtype=torch.long)), (pat, msk, found), (pat, msk, spots)]
    whole, at_found, at_random = (float((predict(model, apply_trigger(x, p, a, pos)) == int(target)).float().mean()) for p, a, pos in cases)
    return whole, at_found, at_random


def estimate_extent(
    model: nn.Module,
    data: ImageSet,
    target: int,
    rng: torch.Generator,
    scan: ScanConfig | None = None,
    cfg: ExtentConfig | None = None,
) -> Extent:
    """Search ``target``'s first-pass trigger on ``data`` (the scan's
    Neural-Cleanse search for that class alone), then its extent."""
    scan = scan or ScanConfig()
    plan = plan_scan(data, scan, rng, [int(target)])
    (found,) = scan_chunks(model, data, scan, plan)
    return extent_from_mask(model, data, target, found.pattern, found.mask, cfg, rng, scan)
