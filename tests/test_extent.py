"""The trigger extent estimate (gdm_ray.core.extent) and MESA's restart of
collapsed levels, on hand-built classifiers whose triggers are known exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.functional import avg_pool2d

from gdm_ray.core.data import ImageSet
from gdm_ray.core.extent import ExtentConfig, box_of_mask, estimate_extent, extent_from_mask
from gdm_ray.core.first_pass import ScanConfig
from gdm_ray.core.mesa import MESA, MESAConfig

TARGET = 1
SCAN = ScanConfig(steps=150, batch_size=32)


class PatchModel(nn.Module):
    """Class 1 when a bright 4x4 patch is present: anywhere (``at`` None) or at ``at`` only; else class 0."""

    def __init__(self, at: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.at = at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = avg_pool2d(x, 4, stride=1)  # N x 1 x 25 x 25: mean of every 4x4 window
        score = local.flatten(1).max(1).values if self.at is None else local[:, 0, self.at[0], self.at[1]]
        logit = 40 * (score - 0.8)
        return torch.stack([torch.zeros_like(logit), logit], 1)


class BlendModel(nn.Module):
    """Class 1 when the image correlates with a fixed full-image pattern: no patch can do it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("key", (torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(5)) - 0.5).sign())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x * self.key).mean((1, 2, 3))
        logit = 40 * (score - 0.06)
        return torch.stack([torch.zeros_like(logit), logit], 1)


def dark_images(n: int = 400) -> ImageSet:
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 0.5
    y = torch.zeros(n, dtype=torch.long)
    y[: n // 4] = TARGET
    return ImageSet(x, y, ["a", "b"])


def patch_mask(r: int, c: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(28, 28)
    mask[r : r + h, c : c + w] = 1.0
    return torch.ones(1, 28, 28), mask


def test_box_of_mask_takes_the_heaviest_blob_and_bridges_gaps():
    mask = torch.zeros(28, 28)
    mask[5, 5] = mask[5, 7] = mask[6, 6] = mask[7, 5] = mask[7, 7] = 1.0  # a checkerboard 3x3
    mask[20, 20] = 0.9  # a stray pixel
    mask[0, 27] = 0.1  # faint mass, below the level
    assert box_of_mask(mask) == (5, 5, 3, 3)
    mask[20:22, 20:23] = 1.0  # a heavier blob elsewhere wins
    assert box_of_mask(mask) == (20, 20, 2, 3)
    assert box_of_mask(torch.zeros(28, 28)) == (0, 0, 28, 28)


def test_a_random_place_patch_is_modelled_larger_than_the_part_found_and_anywhere():
    model, data = PatchModel(), dark_images()
    pattern, mask = patch_mask(10, 10, 2, 3)  # the first pass kept part of the 4x4 patch
    ext = extent_from_mask(model, data, TARGET, pattern, mask, rng=torch.Generator().manual_seed(1), scan=SCAN)
    assert ext.compact and ext.position is None
    assert min(ext.size) >= 4 and max(ext.size) <= 12, ext
    assert ext.asr_random >= 0.9 and ext.asr_found >= 0.9


def test_a_fixed_place_patch_keeps_its_place_and_the_box_covers_it():
    model, data = PatchModel(at=(20, 3)), dark_images()
    pattern, mask = patch_mask(21, 4, 2, 2)
    ext = extent_from_mask(model, data, TARGET, pattern, mask, rng=torch.Generator().manual_seed(1), scan=SCAN)
    assert ext.compact and ext.position is not None, ext
    (r, c), (h, w) = ext.position, ext.size
    assert r <= 20 and c <= 3 and r + h >= 24 and c + w >= 7, ext  # the real 4x4 at (20, 3) lies inside
    assert ext.asr_random < 0.25 * ext.asr_found


def test_a_trigger_spread_over_the_image_is_modelled_over_the_whole_image():
    model, data = BlendModel(), dark_images()
    ext = estimate_extent(model, data, TARGET, torch.Generator().manual_seed(0), SCAN)
    assert ext.size == [28, 28] and ext.position is None, ext  # spread out, or a blob as large as the image
    assert ext.asr_whole >= 0.5


def test_extent_config_checks_its_values():
    with pytest.raises(Exception, match="extent.level=0.0"):
        ExtentConfig(level=0.0)
    with pytest.raises(Exception, match="extent.fixed_ratio=2"):
        ExtentConfig(fixed_ratio=2)


def test_mesa_estimates_the_extent_when_no_size_is_given():
    mesa = MESA(MESAConfig(steps=40, log_every=20, eval_samples=64, extent_steps=150, levels=2))
    res = mesa.fit(PatchModel(), dark_images(), TARGET, torch.Generator().manual_seed(0))
    assert res.extent is not None and res.extent["compact"]
    assert mesa.config.trigger_size == res.extent["size"] and mesa.config.with_mask is True
    assert res.config["trigger_size"] == res.extent["size"]
    patterns, masks = mesa.sample(8, rng=torch.Generator().manual_seed(1))
    assert tuple(patterns.shape[-2:]) == tuple(res.extent["size"]) == tuple(masks.shape[-2:])


def test_an_explicit_size_wins_and_keeps_the_square_patch():
    mesa = MESA(MESAConfig(trigger_size=[3, 3], steps=20, eval_samples=32, levels=2, restarts=0))
    res = mesa.fit(PatchModel(), dark_images(), TARGET, torch.Generator().manual_seed(0))
    assert res.extent is None and mesa.config.with_mask is False and mesa.config.trigger_size == [3, 3]
    with pytest.raises(Exception, match=r"mesa.position=\[1, 1\] needs mesa.trigger_size"):
        MESAConfig(position=[1, 1])


def test_collapsed_levels_restart_with_a_larger_entropy_weight():
    base = dict(trigger_size=[4, 4], steps=40, log_every=20, eval_samples=64, levels=2, alpha=0.1)
    model, data = PatchModel(), dark_images()
    plain = MESA(MESAConfig(**base, restarts=0)).fit(model, data, TARGET, torch.Generator().manual_seed(0))
    never = MESA(MESAConfig(**base, collapse_entropy=0.0)).fit(model, data, TARGET, torch.Generator().manual_seed(0))
    assert never.restarted == [0, 0] and never.entropy == plain.entropy and never.weights == plain.weights
    # every level that meets its beta counts as collapsed below an entropy it cannot reach
    mesa = MESA(MESAConfig(**base, collapse_entropy=1e9, restart_alpha=10.0))
    res = mesa.fit(model, data, TARGET, torch.Generator().manual_seed(0))
    met = [a >= b for a, b in zip(plain.asr, plain.betas)]
    assert res.restarted == [1 if m else 0 for m in met]
    assert any(row.get("restart") == 1 for row in res.history)
    for i, m in enumerate(met):  # a kept restart carries its raised weight
        assert res.level_alpha[i] in (0.1, pytest.approx(1.0)) if m else res.level_alpha[i] == 0.1
    assert abs(sum(res.weights) - 1) < 1e-5
