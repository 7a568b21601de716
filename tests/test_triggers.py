"""Triggers: exact blending, gradients, placement and every family (gdm_ray.core.triggers)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from gdm_ray.core.errors import ConfigError
from gdm_ray.core.triggers import (
    FAMILIES,
    Trigger,
    TriggerSpec,
    apply_trigger,
    make_trigger,
    random_positions,
)


def _patch_mask(n: int, hw: tuple[int, int], positions: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Boolean N x 1 x H x W mask of the pixels each image's trigger covers (built by slicing)."""
    mask = torch.zeros(n, 1, *hw, dtype=torch.bool)
    for i, (r, c) in enumerate(positions.tolist()):
        mask[i, :, r : r + size[0], c : c + size[1]] = True
    return mask


# --- apply_trigger: values -------------------------------------------------------


def test_fixed_patch_values_exact_and_rest_untouched(gen):
    images = torch.rand(3, 3, 8, 10, generator=gen)
    original = images.clone()
    pattern = torch.rand(3, 3, 4, generator=gen)
    mask = torch.ones(3, 4)
    pos = torch.tensor([[2, 5], [0, 0], [5, 6]])  # the last one touches the bottom-right corner
    out = apply_trigger(images, pattern, mask, pos)

    assert out.shape == images.shape
    assert torch.equal(images, original), "apply_trigger must not modify its input"
    for i, (r, c) in enumerate(pos.tolist()):
        assert torch.equal(out[i, :, r : r + 3, c : c + 4], pattern)
    mask = _patch_mask(3, (8, 10), pos, (3, 4)).expand_as(images)
    assert torch.equal(out[~mask], images[~mask])
    assert int(mask[0].sum()) == 3 * 3 * 4


def test_alpha_blending_math(gen):
    images = torch.rand(4, 2, 9, 9, generator=gen)
    pattern = torch.rand(2, 3, 3, generator=gen)
    mask = torch.rand(3, 3, generator=gen)
    mask[0, 0], mask[2, 2] = 0.0, 1.0
    pos = torch.tensor([[0, 0], [6, 6], [3, 1], [1, 4]])
    out = apply_trigger(images, pattern, mask, pos)
    for i, (r, c) in enumerate(pos.tolist()):
        before = images[i, :, r : r + 3, c : c + 3]
        expected = (1 - mask) * before + mask * pattern
        torch.testing.assert_close(out[i, :, r : r + 3, c : c + 3], expected)
        # mask 0 keeps the image pixel, mask 1 takes the pattern pixel, exactly
        assert torch.equal(out[i, :, r, c], images[i, :, r, c])
        assert torch.equal(out[i, :, r + 2, c + 2], pattern[:, 2, 2])
    mask = _patch_mask(4, (9, 9), pos, (3, 3)).expand_as(images)
    assert torch.equal(out[~mask], images[~mask])


def test_per_image_patterns_and_alphas(gen):
    n = 5
    images = torch.rand(n, 3, 7, 7, generator=gen)
    patterns = torch.rand(n, 3, 2, 3, generator=gen)
    masks = torch.rand(n, 2, 3, generator=gen)
    pos = torch.tensor([[0, 0], [5, 4], [1, 2], [3, 3], [2, 0]])
    out = apply_trigger(images, patterns, masks, pos)
    for i, (r, c) in enumerate(pos.tolist()):
        before = images[i, :, r : r + 2, c : c + 3]
        torch.testing.assert_close(out[i, :, r : r + 2, c : c + 3], (1 - masks[i]) * before + masks[i] * patterns[i])
    mask = _patch_mask(n, (7, 7), pos, (2, 3)).expand_as(images)
    assert torch.equal(out[~mask], images[~mask])


def test_one_channel_pattern_broadcasts_over_colour_images(gen):
    images = torch.rand(2, 3, 6, 6, generator=gen)
    pattern = torch.rand(1, 3, 3, generator=gen)
    out = apply_trigger(images, pattern, torch.ones(3, 3), torch.tensor([[1, 2], [3, 0]]))
    for ch in range(3):
        assert torch.equal(out[0, ch, 1:4, 2:5], pattern[0])
        assert torch.equal(out[1, ch, 3:6, 0:3], pattern[0])


def test_pattern_channel_mismatch_is_config_error(gen):
    images = torch.rand(2, 3, 6, 6, generator=gen)
    with pytest.raises(ConfigError, match=re.escape("(2, 2, 3, 3)")):
        apply_trigger(images, torch.rand(2, 3, 3), torch.ones(3, 3), torch.zeros(2, 2, dtype=torch.long))


# --- apply_trigger: gradients ----------------------------------------------------


def test_gradients_analytic_sum(gen):
    """d sum(out) / d pattern = N * a ; d sum(out) / d mask = sum over images and channels of (pattern - before)."""
    images = torch.rand(4, 3, 8, 8, generator=gen)
    pattern = torch.rand(3, 3, 3, generator=gen).requires_grad_()
    mask = torch.rand(3, 3, generator=gen).requires_grad_()
    pos = torch.tensor([[0, 0], [5, 5], [2, 3], [4, 1]])
    apply_trigger(images, pattern, mask, pos).sum().backward()

    torch.testing.assert_close(pattern.grad, 4 * mask.detach().expand(3, 3, 3))
    befores = torch.stack([images[i, :, r : r + 3, c : c + 3] for i, (r, c) in enumerate(pos.tolist())])
    expected_alpha = (pattern.detach() - befores).sum(dim=(0, 1))
    torch.testing.assert_close(mask.grad, expected_alpha)


def test_gradients_weighted_including_images(gen):
    """With a random upstream gradient W: d/d pattern = sum_n W_patch * a,
    d/d mask = sum_n,c W_patch * (pattern - before), d/d images = W outside, W * (1 - a) inside."""
    images = torch.rand(3, 2, 7, 9, generator=gen).requires_grad_()
    pattern = torch.rand(2, 3, 4, generator=gen).requires_grad_()
    mask = torch.rand(3, 4, generator=gen).requires_grad_()
    pos = torch.tensor([[4, 5], [0, 1], [2, 2]])
    weight = torch.randn(3, 2, 7, 9, generator=gen)
    (apply_trigger(images, pattern, mask, pos) * weight).sum().backward()

    a, p = mask.detach(), pattern.detach()
    w_patch = torch.stack([weight[i, :, r : r + 3, c : c + 4] for i, (r, c) in enumerate(pos.tolist())])
    befores = torch.stack([images.detach()[i, :, r : r + 3, c : c + 4] for i, (r, c) in enumerate(pos.tolist())])
    torch.testing.assert_close(pattern.grad, (w_patch * a).sum(0))
    torch.testing.assert_close(mask.grad, (w_patch * (p - befores)).sum(dim=(0, 1)))
    expected_img = weight.clone()
    for i, (r, c) in enumerate(pos.tolist()):
        expected_img[i, :, r : r + 3, c : c + 4] *= 1 - a
    torch.testing.assert_close(images.grad, expected_img)


def test_gradcheck_finite_differences():
    g = torch.Generator().manual_seed(7)
    images = torch.rand(3, 2, 6, 6, generator=g, dtype=torch.float64)
    pattern = torch.rand(3, 2, 2, 3, generator=g, dtype=torch.float64).requires_grad_()  # per-image patterns
    mask = torch.rand(3, 2, 3, generator=g, dtype=torch.float64).requires_grad_()
    pos = torch.tensor([[0, 0], [4, 3], [2, 1]])
    assert torch.autograd.gradcheck(lambda p, a: apply_trigger(images, p, a, pos), (pattern, mask))


# --- placement -------------------------------------------------------------------


def test_random_positions_in_bounds_and_cover_range():
    pos = random_positions(4000, (3, 5), (16, 12), torch.Generator().manual_seed(0))
    assert pos.shape == (4000, 2) and pos.dtype == torch.long
    assert int(pos[:, 0].min()) == 0 and int(pos[:, 0].max()) == 16 - 3
    assert int(pos[:, 1].min()) == 0 and int(pos[:, 1].max()) == 12 - 5


def test_random_positions_seeded():
    a = random_positions(50, (3, 3), (16, 16), torch.Generator().manual_seed(5))
    b = random_positions(50, (3, 3), (16, 16), torch.Generator().manual_seed(5))
    c = random_positions(50, (3, 3), (16, 16), torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_placement_apply_matches_positions_and_is_seeded(gen):
    images = torch.rand(20, 1, 10, 10, generator=gen)
    trig = Trigger(torch.ones(1, 3, 3), torch.ones(3, 3), placement="random")
    out1 = trig.apply(images, torch.Generator().manual_seed(3))
    out2 = trig.apply(images, torch.Generator().manual_seed(3))
    out3 = trig.apply(images, torch.Generator().manual_seed(4))
    assert torch.equal(out1, out2)
    assert not torch.equal(out1, out3)
    pos = trig.positions(20, (10, 10), torch.Generator().manual_seed(3))
    assert torch.equal(out1, apply_trigger(images, trig.pattern, trig.mask, pos))
    # every image got exactly one fully white 3x3 patch, inside the image
    for i, (r, c) in enumerate(pos.tolist()):
        assert 0 <= r <= 7 and 0 <= c <= 7
        assert torch.equal(out1[i, 0, r : r + 3, c : c + 3], torch.ones(3, 3))


@pytest.mark.parametrize(
    ("row", "col", "expected"),
    [(0, 0, (0, 0)), (2, 3, (2, 3)), (-1, -1, (16 - 3, 20 - 3)), (-2, 0, (16 - 4, 0)), (0, -3, (0, 20 - 5))],
)
def test_fixed_positions_negative_count_from_bottom_right(row, col, expected):
    trig = Trigger(torch.ones(1, 3, 3), torch.ones(3, 3), placement="fixed", row=row, col=col)
    pos = trig.positions(4, (16, 20))
    assert pos.shape == (4, 2)
    assert pos.tolist() == [list(expected)] * 4


def test_fixed_bottom_right_applied(gen):
    images = torch.zeros(2, 1, 8, 8)
    trig = make_trigger(TriggerSpec(family="bw3x3", number=511, placement="fixed", row=-1, col=-1), 1, (8, 8))
    out = trig.apply(images)
    assert torch.equal(out[:, :, 5:, 5:], torch.ones(2, 1, 3, 3))
    assert float(out.sum()) == 2 * 9


@pytest.mark.parametrize(("row", "col"), [(6, 0), (0, 6), (-7, 0), (0, -7)])
def test_fixed_position_outside_image_is_config_error(row, col):
    spec = TriggerSpec(family="bw3x3", number=1, placement="fixed", row=row, col=col)
    with pytest.raises(ConfigError, match=f"row={row}, col={col}"):
        make_trigger(spec, 1, (8, 8))


# --- families --------------------------------------------------------------------


def _write_rgba_png(path, rgba: np.ndarray, mode: str = "RGBA") -> None:
    Image.fromarray(rgba, mode=mode).save(path)


@pytest.fixture
def rgba_png(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(4, 5, 4), dtype=np.uint8)
    arr[0, 0, 3] = 0
    arr[3, 4, 3] = 255
    path = tmp_path / "trigger.png"
    _write_rgba_png(path, arr)
    return path, arr


def _spec_for(family: str, png_path) -> TriggerSpec:
    if family == "png":
        return TriggerSpec(family="png", path=str(png_path))
    if family == "random":
        return TriggerSpec(family="random", size=[2, 4], seed=3)
    if family == "block":
        return TriggerSpec(family="block", size=[4, 4])
    return TriggerSpec(family=family, number=5, seed=1)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds(family, channels, rgba_png):
    trig = make_trigger(_spec_for(family, rgba_png[0]), channels, (16, 16))
    expected_hw = {
        "bw3x3": (3, 3),
        "color3x3": (3, 3),
        "random": (2, 4),
        "block": (4, 4),
        "blend": (16, 16),
        "png": (4, 5),
        "sig": (16, 16),
    }
    assert trig.pattern.shape == (channels, *expected_hw[family])
    assert trig.mask.shape == expected_hw[family]
    assert trig.pattern.dtype == torch.float32 and trig.mask.dtype == torch.float32
    assert float(trig.pattern.min()) >= 0 and float(trig.pattern.max()) <= 1
    assert float(trig.mask.min()) >= 0 and float(trig.mask.max()) <= 1
    images = torch.full((2, channels, 16, 16), 0.5)
    out = trig.apply(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape


@pytest.mark.parametrize("channels", [1, 3])
def test_bw3x3_number_bits(channels):
    def pat(number: int) -> torch.Tensor:
        return make_trigger(TriggerSpec(family="bw3x3", number=number), channels, (8, 8)).pattern

    one = torch.zeros(channels, 3, 3)
    one[:, 0, 0] = 1
    assert torch.equal(pat(1), one)
    assert torch.equal(pat(511), torch.ones(channels, 3, 3))
    assert torch.equal(pat(0), torch.zeros(channels, 3, 3))
    last = torch.zeros(channels, 3, 3)
    last[:, 2, 2] = 1  # bit 8 = pixel 8 in row-major order
    assert torch.equal(pat(256), last)
    row1 = torch.zeros(channels, 3, 3)
    row1[:, 1, 0] = 1  # bit 3 = row 1, col 0
    assert torch.equal(pat(8), row1)
    assert torch.equal(make_trigger(TriggerSpec(family="bw3x3", number=7), channels, (8, 8)).mask, torch.ones(3, 3))


def test_seeded_families_are_deterministic():
    for family in ("color3x3", "random"):
        a = make_trigger(TriggerSpec(family=family, seed=11), 3, (8, 8)).pattern
        b = make_trigger(TriggerSpec(family=family, seed=11), 3, (8, 8)).pattern
        c = make_trigger(TriggerSpec(family=family, seed=12), 3, (8, 8)).pattern
        assert torch.equal(a, b), family
        assert not torch.equal(a, c), family


def test_block_solid_colour_and_noise():
    red = make_trigger(TriggerSpec(family="block", size=[2, 3], color=[1.0, 0.0, 0.0]), 3, (8, 8))
    assert torch.equal(red.pattern[0], torch.ones(2, 3))
    assert torch.equal(red.pattern[1:], torch.zeros(2, 2, 3))
    grey = make_trigger(TriggerSpec(family="block", size=[2, 3], color=[1.0, 0.0, 0.0]), 1, (8, 8))
    torch.testing.assert_close(grey.pattern, torch.full((1, 2, 3), 1 / 3))
    noise = make_trigger(TriggerSpec(family="block", size=[5, 2], fill="noise", seed=2), 3, (8, 8))
    assert noise.pattern.shape == (3, 5, 2)
    assert noise.pattern.std() > 0.1


def test_blend_constant_alpha_full_image():
    trig = make_trigger(TriggerSpec(family="blend", blend=0.25, seed=0), 3, (12, 10))
    assert trig.pattern.shape == (3, 12, 10)
    assert torch.equal(trig.mask, torch.full((12, 10), 0.25))
    images = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    out = trig.apply(images)
    torch.testing.assert_close(out, 0.75 * images + 0.25 * trig.pattern)


@pytest.mark.parametrize("channels", [1, 3])
def test_sig_signal_values_exact(channels):
    """v(i, j) = delta * sin(2 pi j f / W) added to every row and channel, written out by hand for W = 4, f = 1."""
    delta = 0.2
    trig = make_trigger(TriggerSpec(family="sig", delta=delta, frequency=1.0), channels, (3, 4))
    assert trig.mode == "add" and trig.size == (3, 4)
    assert float(trig.pattern.min()) >= 0 and float(trig.pattern.max()) <= 1
    images = torch.full((2, channels, 3, 4), 0.5)
    out = trig.apply(images)
    # sin(2 pi j / 4) for j = 0..3 is 0, 1, 0, -1
    row = torch.tensor([0.5, 0.5 + delta, 0.5, 0.5 - delta])
    torch.testing.assert_close(out, row.view(1, 1, 1, 4).expand(2, channels, 3, 4), atol=1e-6, rtol=0)
    # the default, BackdoorBench's 40/255 at 6 periods, on a CIFAR-sized image
    sig = make_trigger(TriggerSpec(family="sig"), 3, (32, 32))
    j = torch.arange(32, dtype=torch.float64)
    v = (40 / 255) * torch.sin(2 * torch.pi * j * 6 / 32)
    x = torch.full((1, 3, 32, 32), 0.5)
    torch.testing.assert_close(sig.apply(x)[0, 1, 7], (0.5 + v).float(), atol=1e-6, rtol=0)


def test_sig_clips_to_unit_range():
    trig = make_trigger(TriggerSpec(family="sig", delta=0.5, frequency=1.0), 1, (2, 4))
    images = torch.tensor([[0.9, 0.9, 0.1, 0.1], [0.0, 1.0, 0.3, 0.2]]).view(1, 1, 2, 4)
    out = trig.apply(images)
    expected = torch.tensor([[0.9, 1.0, 0.1, 0.0], [0.0, 1.0, 0.3, 0.0]]).view(1, 1, 2, 4)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_sig_is_differentiable_and_leaves_blend_mode_alone(gen):
    """The additive mode keeps gradients to the images; every other family stays a blend."""
    trig = make_trigger(TriggerSpec(family="sig", delta=0.1), 3, (8, 8))
    x = torch.full((2, 3, 8, 8), 0.5, requires_grad=True)
    trig.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    for family in ("bw3x3", "color3x3", "random", "block", "blend"):
        assert make_trigger(TriggerSpec(family=family), 3, (16, 16)).mode == "blend", family


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"delta": 0.0}, "trigger.delta"),
        ({"delta": -0.1}, "trigger.delta"),
        ({"delta": 1.5}, "trigger.delta"),
        ({"frequency": 0.0}, "trigger.frequency"),
        ({"frequency": -2.0}, "trigger.frequency"),
        ({"frequency": float("inf")}, "trigger.frequency"),
    ],
)
def test_sig_bad_delta_or_frequency(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TriggerSpec(family="sig", **kwargs)
    TriggerSpec(family="bw3x3", **kwargs)  # only a sig trigger reads them


def test_unknown_trigger_mode():
    with pytest.raises(ConfigError, match="mode"):
        Trigger(torch.zeros(1, 2, 2), torch.ones(2, 2), mode="multiply")
    with pytest.raises(ConfigError, match="mode"):
        apply_trigger(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 2), torch.ones(2, 2), torch.zeros(1, 2, dtype=torch.long), "multiply")


@pytest.mark.parametrize("channels", [1, 3])
def test_png_alpha_channel_becomes_mask(rgba_png, channels):
    path, arr = rgba_png
    trig = make_trigger(TriggerSpec(family="png", path=str(path)), channels, (10, 10))
    rgb = torch.from_numpy(arr[..., :3].astype(np.float32) / 255).permute(2, 0, 1)
    expected = rgb if channels == 3 else rgb.mean(0, keepdim=True)
    torch.testing.assert_close(trig.pattern, expected)
    torch.testing.assert_close(trig.mask, torch.from_numpy(arr[..., 3].astype(np.float32) / 255))
    assert float(trig.mask[0, 0]) == 0.0 and float(trig.mask[3, 4]) == 1.0


def test_png_la_and_resize(tmp_path):
    la = np.zeros((2, 2, 2), dtype=np.uint8)
    la[..., 0] = [[0, 255], [255, 0]]
    la[..., 1] = [[255, 255], [0, 128]]
    path = tmp_path / "la.png"
    _write_rgba_png(path, la, mode="LA")
    trig = make_trigger(TriggerSpec(family="png", path=str(path)), 3, (8, 8))
    assert torch.equal(trig.pattern[:, 0, 1], torch.ones(3))
    assert torch.equal(trig.mask[1, 0], torch.tensor(0.0))
    big = make_trigger(TriggerSpec(family="png", path=str(path), size=[4, 6]), 1, (8, 8))
    assert big.pattern.shape == (1, 4, 6) and big.mask.shape == (4, 6)
    # nearest-neighbour resize keeps the values, including the fully opaque top row
    assert torch.equal(big.mask[0], torch.ones(6))


# --- errors ----------------------------------------------------------------------


def test_trigger_larger_than_image():
    with pytest.raises(ConfigError, match="20x18 is larger than the image 16x16"):
        make_trigger(TriggerSpec(family="block", size=[20, 18]), 1, (16, 16))
    with pytest.raises(ConfigError, match="3x3 is larger than the image 2x8"):
        apply_trigger(torch.rand(1, 1, 2, 8), torch.ones(1, 3, 3), torch.ones(3, 3), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ConfigError, match="larger than the image"):
        random_positions(3, (5, 5), (4, 9))


@pytest.mark.parametrize("bad", [1.5, -0.25])
def test_alpha_outside_unit_range(bad):
    mask = torch.ones(3, 3)
    mask[1, 1] = bad
    with pytest.raises(ConfigError, match=re.escape(f"{bad:.3g}")):
        Trigger(torch.ones(1, 3, 3), mask)
    with pytest.raises(ConfigError, match=re.escape(f"trigger.blend={bad}")):
        TriggerSpec(family="blend", blend=bad)


def test_pattern_outside_unit_range():
    with pytest.raises(ConfigError, match=re.escape("trigger pattern values must lie in [0, 1], got [2, 2]")):
        Trigger(torch.full((1, 3, 3), 2.0), torch.ones(3, 3))


def test_alpha_shape_mismatch():
    with pytest.raises(ConfigError, match=re.escape("(2, 2)")):
        Trigger(torch.ones(1, 3, 3), torch.ones(2, 2))


@pytest.mark.parametrize("number", [512, -1])
def test_bw3x3_number_out_of_range(number):
    with pytest.raises(ConfigError, match=re.escape(f"trigger.number={number}")):
        TriggerSpec(family="bw3x3", number=number)


def test_bad_family_and_placement():
    with pytest.raises(ConfigError, match="'checkerboard'"):
        TriggerSpec(family="checkerboard")
    with pytest.raises(ConfigError, match="'center'"):
        TriggerSpec(placement="center")
    with pytest.raises(ConfigError, match=re.escape("[3]")):
        TriggerSpec(family="random", size=[3])


def test_png_errors(tmp_path):
    not_png = tmp_path / "notes.png"
    not_png.write_text("this is not an image\n")
    with pytest.raises(ConfigError, match=re.escape(str(not_png))):
        make_trigger(TriggerSpec(family="png", path=str(not_png)), 3, (16, 16))
    missing = tmp_path / "missing.png"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        make_trigger(TriggerSpec(family="png", path=str(missing)), 3, (16, 16))
    with pytest.raises(ConfigError, match="trigger.path"):
        TriggerSpec(family="png")


def test_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    for make in (
        lambda: TriggerSpec(family="bw3x3", number=512),
        lambda: make_trigger(TriggerSpec(family="png", path=str(bad)), 1, (8, 8)),
        lambda: make_trigger(TriggerSpec(family="block", size=[9, 9]), 1, (8, 8)),
    ):
        with pytest.raises(ConfigError) as info:
            make()
        assert "\n" not in str(info.value)
