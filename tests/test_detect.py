"""Per-class scan with an unknown target, on synthetic 8-class data."""

from __future__ import annotations

import copy

import pytest
import torch

from gdm_ray.core.attack import BadNets
from gdm_ray.core.data import DataSpec, load_splits
from gdm_ray.core.defense import DefenseConfig, retrain
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.first_pass import ScanConfig, anomaly_index, scan_classes
from gdm_ray.core.mesa import MESA, MESAConfig
from gdm_ray.core.metrics import attack_success_rate
from gdm_ray.core.models import build_model
from gdm_ray.core.moving_window import default_window, window_heatmap
from gdm_ray.core.plots import save_heatmap
from gdm_ray.core.train import TrainConfig, train_classifier
from gdm_ray.core.triggers import Trigger, TriggerSpec, make_trigger

FAST = ScanConfig(steps=200)


@pytest.fixture(scope="module")
def splits():
    return load_splits(DataSpec(name="synthetic", samples=3000, num_classes=8, image_size=[16, 16], seed=3))


def _train(splits, attacks: list[BadNets]) -> torch.nn.Module:
    torch.manual_seed(0)  # build_model initialises from the global RNG
    model = build_model("small_cnn", 1, 8, 8)

    def hook(x, y, g):
        for a in attacks:
            x, y = a.poison_batch(x, y, g)
        return x, y

    cfg = TrainConfig(epochs=5, batch_size=64, lr=0.05, channels_last=False)
    train_classifier(model, splits.train, cfg, torch.Generator().manual_seed(0), hook if attacks else None)
    model.eval()
    for a in attacks:
        assert attack_success_rate(model, splits.eval, a.trigger, a.target) > 0.9
    return model


def _trigger(number: int):
    return make_trigger(TriggerSpec(family="bw3x3", number=number), 1, (16, 16))


def test_backdoored_target_is_found(splits):
    model = _train(splits, [BadNets(_trigger(341), 2, 0.2)])
    r = scan_classes(model, splits.defense, FAST, torch.Generator().manual_seed(0))
    assert r.backdoored and r.flagged == [2], (r.flagged, r.anomaly)
    assert r.score == pytest.approx(max(r.anomaly)) and r.anomaly[2] == r.score
    found = r.classes[2]
    assert found.valid and found.asr > 0.9
    # the found mask is a small region, about the 3x3 trigger's size
    assert found.size < 20, found.size
    assert r.passes == FAST.steps  # 8 classes in one pass per step


def test_clean_model_is_not_flagged(splits):
    model = _train(splits, [])
    r = scan_classes(model, splits.defense, FAST, torch.Generator().manual_seed(0))
    assert not r.backdoored and r.flagged == [], (r.anomaly, [c.size for c in r.classes])
    assert r.score < FAST.threshold


def test_two_targets_are_both_reported(splits):
    model = _train(splits, [BadNets(_trigger(341), 2, 0.2), BadNets(_trigger(7), 5, 0.2)])
    r = scan_classes(model, splits.defense, FAST, torch.Generator().manual_seed(0))
    assert sorted(r.flagged) == [2, 5], (r.flagged, r.anomaly)


def test_classes_in_several_passes_give_the_same_classes(splits):
    model = _train(splits, [BadNets(_trigger(341), 2, 0.2)])
    r = scan_classes(model, splits.defense, ScanConfig(steps=200, classes_per_pass=3), torch.Generator().manual_seed(0))
    assert r.passes == 3 * 200 and len(r.classes) == 8 and [c.target for c in r.classes] == list(range(8))
    assert r.flagged == [2]


def test_anomaly_index():
    idx = anomaly_index([100, 120, 90, 110, 9])
    assert idx[4] > 2 and max(idx[:4]) < 2
    assert anomaly_index([50, 50, 50]) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"steps": 0}, "scan.steps=0"),
        ({"asr_goal": 1.5}, "scan.asr_goal=1.5"),
        ({"cost_step": 1}, "scan.cost_step=1"),
        ({"method": "magic"}, "scan.method='magic'"),
    ],
)
def test_bad_config(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        ScanConfig(**kwargs)


def test_bad_classes(splits):
    model = build_model("small_cnn", 1, 8, 8).eval()
    with pytest.raises(ConfigError, match=r"\[9\]"):
        scan_classes(model, splits.defense, FAST, classes=[1, 9])


IRREGULAR = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.float32)


@pytest.fixture(scope="module")
def fixed_backdoor(splits):
    pattern = torch.tensor([[[1.0, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]])
    trig = Trigger(pattern=pattern, mask=IRREGULAR, placement="fixed", row=10, col=9)
    return _train(splits, [BadNets(trig, 2, 0.2)]), trig


@pytest.fixture(scope="module")
def fixed_heat(splits, fixed_backdoor):
    model, _ = fixed_backdoor
    return window_heatmap(model, splits.defense, 2, ScanConfig(steps=150), stride=(2, 2), rng=torch.Generator().manual_seed(0))


def test_moving_window_finds_a_fixed_irregular_trigger(splits, fixed_heat, tmp_path):
    hm = fixed_heat
    assert hm.window == default_window((16, 16)) == (4, 5)
    assert hm.heat.shape == (16, 16)
    r, c = hm.peak
    assert 9 <= r <= 14 and 8 <= c <= 13, (hm.peak, hm.heat)
    # the strongest window overlaps the trigger, and the box covers the trigger's centre
    best = max(range(len(hm.windows)), key=lambda j: hm.strength[j])
    br, bc = hm.windows[best]
    assert br <= 13 and br + 4 > 10 and bc <= 12 and bc + 5 > 9
    r0, c0, h, w = hm.box
    assert r0 <= 11 < r0 + h and c0 <= 10 < c0 + w, hm.box
    # windows far from the trigger find nothing strong
    far = [s for (wr, wc), s in zip(hm.windows, hm.strength) if wr + 4 <= 8 and wc + 5 <= 7]
    assert far and max(far) < hm.strength[best] / 2
    png = save_heatmap(tmp_path / "heat.png", hm.heat, splits.eval.x[0], hm.box, (hm.patterns[best], hm.masks[best]))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_window_larger_than_image_is_an_error(splits):
    model = build_model("small_cnn", 1, 8, 8).eval()
    with pytest.raises(ConfigError, match="20x20"):
        window_heatmap(model, splits.defense, 1, FAST, window=(20, 20))


def test_heat_box_drives_a_fixed_position_mesa_and_defense(splits, fixed_backdoor, fixed_heat):
    model, trig = fixed_backdoor
    r0, c0, h, w = fixed_heat.box
    mesa = MESA(MESAConfig(steps=250, trigger_size=[h, w], position=[r0, c0], with_mask=True, log_every=50))
    res = mesa.fit(model, splits.defense, 2, torch.Generator().manual_seed(0))
    assert mesa.position == (r0, c0)
    assert res.asr[-1] > 0.5, res.asr
    repaired = copy.deepcopy(model)
    retrain(repaired, splits.defense, [mesa], DefenseConfig(epochs=4), torch.Generator().manual_seed(0))
    before = attack_success_rate(model, splits.eval, trig, 2)
    after = attack_success_rate(repaired, splits.eval, trig, 2)
    assert before > 0.9 and after < 0.3, (before, after)


def test_mesa_position_must_fit(splits, fixed_backdoor):
    model, _ = fixed_backdoor
    with pytest.raises(ConfigError, match=r"mesa.position=\[14, 14\]"):
        MESA(MESAConfig(steps=1, trigger_size=[4, 4], position=[14, 14])).fit(model, splits.defense, 2)


def test_reference_anomaly_ignores_natural_triggers_and_finds_the_injected_one():
    from gdm_ray.core.first_pass import reference_anomaly

    # class 3 is naturally easy in every model; model 4 has an injected backdoor in class 1;
    # model 2 is an architecture whose triggers are all 3x larger
    base = [60.0, 50.0, 45.0, 15.0, 55.0, 40.0]
    jitter = [
        [1.0, 1.1, 0.9, 1.05, 0.95, 1.0],
        [0.9, 1.0, 1.1, 0.95, 1.05, 1.1],
        [1.1, 0.9, 1.0, 1.0, 1.0, 0.95],
        [1.0, 1.05, 0.95, 1.1, 0.9, 1.0],
        [0.95, 1.0, 1.05, 0.9, 1.1, 1.05],
    ]
    sizes = [[b * j for b, j in zip(base, js)] for js in jitter]
    sizes[2] = [3 * v for v in sizes[2]]
    sizes[4][1] = 3.0
    within = anomaly_index(sizes[0])
    assert max(range(6), key=lambda k: within[k]) == 3 and within[3] > 2  # a within-model index flags the natural class
    table = reference_anomaly(sizes)
    assert table[4][1] > 5
    assert max(a for m, row in enumerate(table) for k, a in enumerate(row) if (m, k) != (4, 1)) < 2
    with pytest.raises(ValueError, match="at least 3"):
        reference_anomaly(sizes[:2])
