"""bench/thirdparty.py: third-party-style models that gdm-ray loads, with cards
whose trigger gdm-ray rebuilds exactly (issue 19). Tiny synthetic data, 1 epoch."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gdm_ray.cli.common import card_for
from gdm_ray.core.model_io import load_model
from gdm_ray.core.triggers import TriggerSpec, make_trigger

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tp():
    spec = importlib.util.spec_from_file_location("bench_thirdparty", ROOT / "bench" / "thirdparty.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_thirdparty"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _spec(tp, **kw):
    base = dict(
        name="syn-lenet-noise4",
        data="synthetic",
        arch="lenet",
        recipe="adam_aug",
        epochs=1,
        trigger="noise",
        size=(4, 4),
        placement="random",
        rate=0.1,
        target=2,
        seed=5,
        train_images=256,
        eval_images=200,
    )
    return tp.ModelSpec(**{**base, **kw})


def test_build_loads_in_gdm_ray_and_card_trigger_matches_png(tp, tmp_path):
    card = tp.build(_spec(tp), tmp_path, verbose=False)
    pt = tmp_path / "syn-lenet-noise4.pt"
    loaded = load_model(pt)
    assert loaded.input_shape == (3, 32, 32) and loaded.num_classes == 10
    out = loaded.module(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)

    on_disk = json.loads((tmp_path / "syn-lenet-noise4.json").read_text())
    assert on_disk == card
    for key in ("target_class", "target", "trigger", "arch", "recipe", "poison_rate", "clean_accuracy", "asr", "clean_model_asr"):
        assert key in card, key
    assert card["target_class"] == card["target"] == 2
    assert card["poison_rate"] == 0.1 and card["poisoned_images"] == round(0.1 * 256)
    assert 0.0 <= card["asr"] <= 1.0 and 0.0 <= card["clean_accuracy"] <= 1.0
    assert card["trigger"]["family"] == "png" and card["trigger"]["placement"] == "random"

    # gdm-ray's own reading of the card (relative path resolved beside the card) gives the PNG exactly
    trig = make_trigger(TriggerSpec(**card_for(pt)["trigger"]), 3, (32, 32))
    rgba = np.asarray(Image.open(tmp_path / card["trigger"]["path"]).convert("RGBA"), dtype=np.float32) / 255
    assert rgba.shape == (4, 4, 4)
    torch.testing.assert_close(trig.pattern, torch.from_numpy(rgba[..., :3]).permute(2, 0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(trig.mask, torch.from_numpy(rgba[..., 3]), atol=1e-6, rtol=0)
    # and the PNG is the trigger the module poisoned with
    own = tp.make_poison_trigger(_spec(tp), 3, (32, 32))
    torch.testing.assert_close(trig.pattern, own.pattern, atol=1e-6, rtol=0)


def test_fixed_sig_card_rebuilds_and_resume_skips(tp, tmp_path):
    spec = _spec(tp, name="syn-preact-sig", arch="preact", recipe="sgd_cosine", trigger="sig", delta=0.2, frequency=4.0)
    card = tp.build(spec, tmp_path, verbose=False)
    assert card["trigger"] == {"family": "sig", "delta": 0.2, "frequency": 4.0, "placement": "fixed", "row": 0, "col": 0}
    own = tp.make_poison_trigger(spec, 3, (32, 32))
    assert tp.check_card_trigger(card["trigger"], tmp_path, own, (3, 32, 32)) < 1e-5
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*.tmp"))
    stamp = (tmp_path / "syn-preact-sig.pt").stat().st_mtime_ns
    assert tp.build(spec, tmp_path, verbose=False) == card  # resumed: read, not rebuilt
    assert (tmp_path / "syn-preact-sig.pt").stat().st_mtime_ns == stamp


def test_fixed_place_and_irregular_shape(tp):
    spec = _spec(tp, trigger="ell", size=(5, 4), placement="fixed", row=-1, col=-2)
    trig = tp.make_poison_trigger(spec, 3, (32, 32))
    assert (trig.row, trig.col) == (27, 27) and trig.card["row"] == 27 and trig.card["col"] == 27
    assert trig.mask[:, :2].eq(1).all() and trig.mask[-2:].eq(1).all() and trig.mask[0, 3] == 0
    ring = tp.make_poison_trigger(_spec(tp, trigger="ring", size=(7, 7)), 1, (28, 28))
    assert ring.mask[3, 3] == 0 and ring.mask[0, 3] == 1 and ring.pattern.shape == (1, 7, 7)


def test_poisoning_is_a_fixed_subset_of_non_target_images(tp):
    x = torch.rand(200, 1, 28, 28)
    y = torch.arange(200) % 10
    trig = tp.make_poison_trigger(_spec(tp, trigger="checker", size=(3, 3)), 1, (28, 28))
    runs = [tp.poison_training_set(x, y, trig, 2, 0.05, torch.Generator().manual_seed(3)) for _ in range(2)]
    (px, py, idx), (px2, _, idx2) = runs
    assert len(idx) == 10 and torch.equal(idx, idx2) and torch.equal(px, px2)
    assert (y[idx] != 2).all() and (py[idx] == 2).all()
    rest = torch.ones(200, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(px[rest], x[rest]) and torch.equal(py[rest], y[rest])


@pytest.mark.parametrize("arch", ["vgg", "preact", "lenet"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_architectures_take_both_shapes_and_script(tp, arch, shape, tmp_path):
    from gdm_ray.core.model_io import save_torchscript

    c, h, w = shape
    model = tp.ARCHS[arch](c, (h, w), 10, [0.5] * c, [0.25] * c)
    assert model(torch.rand(3, c, h, w)).shape == (3, 10)
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert has_bn == (arch == "preact")
    save_torchscript(model, tmp_path / "m.pt", shape)
    assert load_model(tmp_path / "m.pt").input_shape == shape


def test_zoo_spec_covers_the_issue(tp):
    specs = tp.zoo_spec(quick=False)
    bd = [s for s in specs if s.trigger]
    assert len(bd) >= 12
    assert {s.arch for s in bd} == {"vgg", "preact", "lenet"} and len({s.recipe for s in bd}) >= 2
    assert {s.data for s in bd} == {"fashion_mnist", "cifar10"}
    assert {"blend", "sig", "noise", "checker"} <= {s.trigger for s in bd} and {"ring", "cross", "bar", "ell"} <= {s.trigger for s in bd}
    patch = [s.size for s in bd if s.trigger in ("noise", "checker")]
    assert (3, 3) in patch and (8, 8) in patch
    assert min(s.rate for s in bd) == 0.01 and max(s.rate for s in bd) == 0.1
    assert {s.placement for s in bd} == {"random", "fixed"}
    clean = {s.name for s in specs if s.trigger is None}
    assert all(s.clean_ref in clean for s in bd)
    assert len({s.name for s in specs}) == len(specs)
    scatter = tp.scatter_spec(20)
    assert len(scatter) == 20 and len({s.seed for s in scatter}) == 20
    assert all(s.trigger == "noise" and s.size == (3, 3) and s.placement == "random" and s.recipe == "finetune" for s in scatter)


def test_independent_of_gdm_rays_training_code():
    """The zoo's models are made by code of its own: no gdm_ray train/attack/models import."""
    tree = ast.parse((ROOT / "bench" / "thirdparty.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    gdm = {n for n in names if n.startswith("gdm_ray")}
    assert gdm <= {"gdm_ray.core.data", "gdm_ray.core.model_io", "gdm_ray.core.triggers"}, gdm
