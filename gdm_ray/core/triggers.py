"""Backdoor triggers: a pattern, a transparency mask and a placement.

Applying a trigger is ``after = (1 - a) * before + a * pattern`` on the patch
it covers (DESIGN.md section 1, "arbitrary shape"). The operation is batched
and differentiable in both pattern and mask, so the same function serves the
attack, the metrics, and the generators of the trigger search (which hand in
one pattern per image).

Additive triggers (SIG, Barni, Kallas, Tondi, "A new backdoor attack in CNNs by
training set corruption without label poisoning", ICIP 2019) add a signal
instead of blending one in: ``after = clip(before + a * (2 * pattern - 1), 0, 1)``
(``mode="add"``). The signed offset is encoded in the same two unit-range
tensors as a blend: the pattern says the direction (0.5 = no change, 1 = up,
0 = down) and the mask the strength, so every [0, 1] check, picture and
placement rule of a blended trigger still holds and no third tensor is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gdm_ray.core.errors import ConfigError

__all__ = [
    "Trigger",
    "TriggerSpec",
    "apply_trigger",
    "make_trigger",
    "random_positions",
    "sig_pattern",
    "FAMILIES",
    "MODES",
]

FAMILIES = ("bw3x3", "color3x3", "random", "block", "blend", "png", "sig")
MODES = ("blend", "add")

# SIG's defaults as BackdoorBench v2 (config/attack/sig/default.yaml) uses them:
# amplitude 40 of 255 grey levels, 6 periods over the image width.
SIG_DELTA = 40 / 255
SIG_FREQUENCY = 6.0


@dataclass
class TriggerSpec:
    """What a trigger is, as configs and model cards describe it.

    family: one of FAMILIES.
      bw3x3     3x3 black-white pattern by ``number`` (0..511, bit i = pixel i
                in row-major order, as in the MESA paper);
      color3x3  3x3 pattern of random colours drawn with ``seed``;
      random    uniform random pattern of ``size`` drawn with ``seed``;
      block     a ``size`` block, ``fill`` "solid" (``color``) or "noise";
      blend     full-image noise blended with constant opacity ``blend``;
      png       an RGBA (or LA) PNG at ``path``: its alpha channel is the mask;
      sig       SIG's additive horizontal sinusoid over the whole image (or
                ``size``): ``v(i, j) = delta * sin(2 pi j frequency / W)``,
                ``after = clip(before + v, 0, 1)``; ``delta`` in (0, 1] on the
                [0, 1] pixel scale, ``frequency`` periods over the width W.
    placement: "random" (a new location per image) or "fixed" (``row``, ``col``;
      negative values count from the bottom/right edge as in Python indexing).
    """

    family: str = "bw3x3"
    number: int = 0
    size: list[int] | None = None
    seed: int = 0
    fill: str = "solid"
    color: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    blend: float = 0.1
    path: str | None = None
    delta: float = SIG_DELTA
    frequency: float = SIG_FREQUENCY
    placement: str = "random"
    row: int = 0
    col: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"trigger.family={self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.placement not in ("random", "fixed"):
            raise ConfigError(f"trigger.placement={self.placement!r} must be 'random' or 'fixed'")
        if self.family == "bw3x3" and not 0 <= int(self.number) <= 511:
            raise ConfigError(f"trigger.number={self.number} must be in 0..511 for a 3x3 black-white trigger")
        if self.family == "blend" and not 0.0 <= float(self.blend) <= 1.0:
            raise ConfigError(f"trigger.blend={self.blend} must be in [0, 1]")
        if self.family == "sig":
            if not 0.0 < float(self.delta) <= 1.0:
                raise ConfigError(f"trigger.delta={self.delta} must be in (0, 1] (the signal's amplitude on the [0, 1] pixel scale)")
            if not (math.isfinite(float(self.frequency)) and float(self.frequency) > 0.0):
                raise ConfigError(f"trigger.frequency={self.frequency} must be a positive number of periods over the image width")
        if self.fill not in ("solid", "noise"):
            raise ConfigError(f"trigger.fill={self.fill!r} must be 'solid' or 'noise'")
        if self.size is not None:
            self.size = [int(s) for s in self.size]
            if len(self.size) != 2 or min(self.size) < 1:
                raise ConfigError(f"trigger.size={self.size} must be two positive integers [h, w]")
        if self.family == "png" and not self.path:
            raise ConfigError("trigger.path is required for a png trigger")


@dataclass
class Trigger:
    """A concrete trigger: pattern C x h x w in [0,1], mask h x w in [0,1].

    mode "blend" (every family but sig): ``after = (1 - mask) * before + mask * pattern``;
    mode "add" (sig): ``after = clip(before + mask * (2 * pattern - 1), 0, 1)``.
    """

    pattern: torch.Tensor
    mask: torch.Tensor
    placement: str = "random"
    row: int = 0
    col: int = 0
    mode: str = "blend"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"trigger mode {self.mode!r} must be one of {', '.join(MODES)}")
        if self.pattern.dim() != 3:
            raise ConfigError(f"trigger pattern must be C x h x w, got shape {tuple(self.pattern.shape)}")
        if self.mask.shape != self.pattern.shape[1:]:
            raise ConfigError(f"trigger mask shape {tuple(self.mask.shape)} does not match pattern {tuple(self.pattern.shape[1:])}")
        _check_unit_range("trigger mask", self.mask)
        _check_unit_range("trigger pattern", self.pattern)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pattern.shape[1]), int(self.pattern.shape[2])

    def positions(self, n: int, image_hw: tuple[int, int], rng: torch.Generator | None = None) -> torch.Tensor:
        """Top-left corners (n x 2) where this trigger goes on n images."""
        h, w = self.size
        _check_fits((h, w), image_hw)
        if self.placement == "random":
            return random_positions(n, (h, w), image_hw, rng)
        r, c = _resolve_fixed(self.row, self.col, (h, w), image_hw)
        return torch.tensor([[r, c]], dtype=torch.long).expand(n, 2)

    def apply(self, images: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
        pos = self.positions(images.shape[0], tuple(images.shape[2:]), rng)
        return apply_trigger(images, self.pattern.to(images), self.mask.to(images), pos, self.mode)


def _check_unit_range(name: str, t: torch.Tensor) -> None:
    if t.numel() and (float(t.min()) < 0.0 or float(t.max()) > 1.0):
        raise ConfigError(f"{name} values must lie in [0, 1], got [{float(t.min()):.3g}, {float(t.max()):.3g}]")


def _check_fits(trigger_hw: tuple[int, int], image_hw: tuple[int, int]) -> None:
    if trigger_hw[0] > image_hw[0] or trigger_hw[1] > image_hw[1]:
        raise ConfigError(f"trigger size {trigger_hw[0]}x{trigger_hw[1]} is larger than the image {image_hw[0]}x{image_hw[1]}")


def _resolve_fixed(row: int, col: int, trigger_hw: tuple[int, int], image_hw: tuple[int, int]) -> tuple[int, int]:
    h, w = trigger_hw
    H, W = image_hw
    r = row if row >= 0 else H - h + 1 + row
    c = col if col >= 0 else W - w + 1 + col
    if not (0 <= r <= H - h and 0 <= c <= W - w):
        raise ConfigError(f"trigger at row={row}, col={col} with size {h}x{w} does not fit in a {H}x{W} image")
    return r, c


def random_positions(n: int, trigger_hw: tuple[int, int], image_hw: tuple[int, int], rng: torch.Generator | None = None) -> torch.Tensor:
    """n uniformly random top-left corners at which a trigger fits entirely."""
    _check_fits(trigger_hw, image_hw)
    hi = torch.tensor([image_hw[0] - trigger_hw[0] + 1, image_hw[1] - trigger_hw[1] + 1])
    return (torch.rand(n, 2, generator=rng) * hi).long()


def place(
    n: int,
    trigger_hw: tuple[int, int],
    image_hw: tuple[int, int],
    fixed: tuple[int, int] | None = None,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """n top-left corners: ``fixed`` repeated (a fixed-location trigger), or random ones."""
    if fixed is None:
        return random_positions(n, trigger_hw, image_hw, rng)
    _check_fits(trigger_hw, image_hw)
    return torch.tensor([list(fixed)], dtype=torch.long).expand(n, 2)


def apply_trigger(
    images: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, mode: str = "blend"
) -> torch.Tensor:
    """Blend (or, mode "add", add) a trigger into a batch of images at the given top-left corners.

    images: N x C x H x W; pattern: C x h x w or N x C x h x w (one per image,
    as a generator produces); mask: h x w or N x h x w; positions: N x 2 long.
    Returns a new tensor; gradients flow to pattern and mask (and images).
    """
    if mode not in MODES:
        raise ConfigError(f"trigger mode {mode!r} must be one of {', '.join(MODES)}")
    n, ch, H, W = images.shape
    if pattern.dim() == 3:
        pattern = pattern.unsqueeze(0).expand(n, -1, -1, -1)
    if mask.dim() == 2:
        mask = mask.unsqueeze(0).expand(n, -1, -1)
    if pattern.shape[1] == 1 and ch > 1:
        pattern = pattern.expand(-1, ch, -1, -1)
    if pattern.shape[0] != n or pattern.shape[1] != ch:
        raise ConfigError(f"trigger pattern shape {tuple(pattern.shape)} does not fit images {tuple(images.shape)}")
    h, w = pattern.shape[2:]
    _check_fits((h, w), (H, W))
    positions = positions.to(images.device)
    # Index grids for the patch of each image: (n, h, w) rows/cols, then gather
    # the patch as (n, h, w, C) so one index_put blends every image at once.
    rows = (positions[:, 0, None] + torch.arange(h, device=images.device))[:, :, None].expand(n, h, w)
    cols = (positions[:, 1, None] + torch.arange(w, device=images.device))[:, None, :].expand(n, h, w)
    idx = torch.arange(n, device=images.device)[:, None, None].expand(n, h, w)
    flat = images.permute(0, 2, 3, 1)  # N x H x W x C view
    before = flat[idx, rows, cols]  # n x h x w x C
    a = mask.unsqueeze(-1)
    if mode == "add":
        after = (before + a * (2 * pattern.permute(0, 2, 3, 1) - 1)).clamp(0.0, 1.0)
    else:
        after = (1 - a) * before + a * pattern.permute(0, 2, 3, 1)
    out = flat.index_put((idx, rows, cols), after)
    return out.permute(0, 3, 1, 2).contiguous()


def make_trigger(spec: TriggerSpec, channels: int, image_hw: tuple[int, int]) -> Trigger:
    """Build the concrete trigger a spec describes, for images of this shape."""
    rng = torch.Generator().manual_seed(int(spec.seed))
    fam = spec.family
    if fam == "bw3x3":
        bits = [(int(spec.number) >> i) & 1 for i in range(9)]
        pattern = torch.tensor(bits, dtype=torch.float32).view(1, 3, 3).expand(channels, 3, 3).clone()
        mask = torch.ones(3, 3)
    elif fam == "color3x3":
        pattern = torch.rand(channels, 3, 3, generator=rng)
        mask = torch.ones(3, 3)
    elif fam == "random":
        h, w = spec.size or [3, 3]
        pattern = torch.rand(channels, h, w, generator=rng)
        mask = torch.ones(h, w)
    elif fam == "block":
        h, w = spec.size or [16, 16]
        if spec.fill == "solid":
            color = _channel_values(spec.color, channels)
            pattern = color.view(channels, 1, 1).expand(channels, h, w).clone()
        else:
            pattern = torch.rand(channels, h, w, generator=rng)
        mask = torch.ones(h, w)
    elif fam == "blend":
        h, w = spec.size or list(image_hw)
        pattern = torch.rand(channels, h, w, generator=rng)
        mask = torch.full((h, w), float(spec.blend))
    elif fam == "sig":
        h, w = spec.size or list(image_hw)
        pattern, mask = sig_pattern(channels, (h, w), float(spec.delta), float(spec.frequency))
    else:  # png
        pattern, mask = _load_png(Path(str(spec.path)), channels, spec.size)
    mode = "add" if fam == "sig" else "blend"
    trig = Trigger(pattern, mask, spec.placement, int(spec.row), int(spec.col), mode)
    _check_fits(trig.size, image_hw)
    if spec.placement == "fixed":
        _resolve_fixed(trig.row, trig.col, trig.size, image_hw)
    return trig


def sig_pattern(channels: int, hw: tuple[int, int], delta: float, frequency: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SIG's signal v(i, j) = delta * sin(2 pi j frequency / w) as an additive
    trigger's (pattern, mask): pattern 0.5 + 0.5 * sin(...), mask delta, so
    ``mask * (2 * pattern - 1) == v``; the same on every row and channel."""
    h, w = hw
    wave = torch.sin(2 * math.pi * torch.arange(w, dtype=torch.float64) * float(frequency) / w)
    pattern = (0.5 + 0.5 * wave).to(torch.float32).view(1, 1, w).expand(channels, h, w).contiguous()
    return pattern, torch.full((h, w), float(delta))


def _channel_values(values: list[float], channels: int) -> torch.Tensor:
    v = torch.tensor([float(x) for x in values], dtype=torch.float32)
    _check_unit_range("trigger.color", v)
    if v.numel() == channels:
        return v
    if v.numel() in (1, 3):
        # Grey images take the mean of an RGB colour; colour images repeat a grey value.
        return v.mean().expand(channels).clone() if channels != v.numel() else v
    raise ConfigError(f"trigger.color={values} needs 1, 3 or {channels} values")


def _load_png(path: Path, channels: int, size: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError) as exc:
        raise ConfigError(f"trigger.path={path}: cannot read PNG ({exc})") from None
    img = img.convert("RGBA")
    if size is not None:
        img = img.resize((size[1], size[0]), Image.NEAREST)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    rgb, a = arr[..., :3], arr[..., 3]
    pattern = torch.from_numpy(rgb).permute(2, 0, 1)
    if channels == 1:
        pattern = pattern.mean(0, keepdim=True)
    elif channels != 3:
        pattern = pattern.mean(0, keepdim=True).expand(channels, -1, -1)
    return pattern.contiguous(), torch.from_numpy(a).contiguous()
