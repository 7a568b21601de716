"""Baseline search, ensemble artifacts and the defense, on synthetic data."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from gdm_ray.core.attack import BadNets
from gdm_ray.core.baseline import BaselineConfig, BaselineResult, PixelBaseline, load_trigger, save_trigger
from gdm_ray.core.data import DataSpec, load_splits
from gdm_ray.core.defense import DefenseConfig, retrain
from gdm_ray.core.ensemble import EnsembleError, load_ensemble, save_ensemble
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.mesa import MESA, MESAConfig
from gdm_ray.core.metrics import attack_success_rate, clean_accuracy, sampled_asr
from gdm_ray.core.models import build_model
from gdm_ray.core.repair import repair
from gdm_ray.core.train import TrainConfig
from gdm_ray.core.triggers import TriggerSpec, make_trigger

TARGET = 2


@pytest.fixture(scope="module")
def backdoored():
    splits = load_splits(DataSpec(name="synthetic", samples=3000, num_classes=4, image_size=[16, 16], seed=3))
    trigger = make_trigger(TriggerSpec(family="bw3x3", number=341), 1, (16, 16))
    torch.manual_seed(0)  # the weights' initial draw too: the global stream depends on which tests ran before
    model = build_model("small_cnn", 1, 4, 8)
    cfg = TrainConfig(epochs=5, batch_size=64, lr=0.05, channels_last=False)
    BadNets(trigger, TARGET, 0.2).fit(model, splits.train, splits.eval, cfg, torch.Generator().manual_seed(0))
    model.eval()
    assert attack_success_rate(model, splits.eval, trigger, TARGET) > 0.9
    return model, splits, trigger


@pytest.fixture(scope="module")
def fitted(backdoored):
    model, splits, _ = backdoored
    mesa = MESA(MESAConfig(trigger_size=[3, 3], restarts=0, steps=300, alpha=0.1, log_every=100))
    result = mesa.fit(model, splits.defense, TARGET, torch.Generator().manual_seed(1))
    return mesa, result


def test_baseline_finds_a_working_trigger(backdoored):
    model, splits, _ = backdoored
    base = PixelBaseline(BaselineConfig(steps=150, restarts=2))
    res = base.fit(model, splits.defense, TARGET, torch.Generator().manual_seed(0))
    assert res.pattern.shape == (1, 3, 3) and res.mask.shape == (3, 3)
    assert 0 <= float(res.pattern.min()) and float(res.pattern.max()) <= 1
    assert len(res.restart_asr) == 2 and res.asr == max(res.restart_asr)
    assert res.asr > 0.8
    # held-out images too
    assert sampled_asr(model, splits.eval, base, TARGET, torch.Generator().manual_seed(0)) > 0.8
    p, a = base.sample(5)
    assert p.shape == (5, 1, 3, 3) and torch.equal(p[0], p[4])


def test_baseline_trigger_file_round_trip_and_bad_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    res = BaselineResult(torch.rand(3, 3, 2, generator=g), torch.rand(3, 2, generator=g), 0.75, [0.5, 0.75], 4)
    save_trigger(res, tmp_path / "t.safetensors")
    back = load_trigger(tmp_path / "t.safetensors")
    assert torch.equal(back.pattern, res.pattern) and torch.equal(back.mask, res.mask)
    assert (back.target, back.asr, back.restart_asr) == (4, 0.75, [0.5, 0.75])
    p, a = PixelBaseline.from_result(back).sample(3)
    assert torch.equal(p[2], res.pattern) and torch.equal(a[0], res.mask)
    with pytest.raises(ConfigError, match="not target=1"):
        load_trigger(tmp_path / "t.safetensors", target=1)
    # a file from before the metadata: the target comes from the caller
    from safetensors.torch import save_file

    save_file({"pattern": res.pattern, "alpha": res.mask}, str(tmp_path / "old.safetensors"))
    assert load_trigger(tmp_path / "old.safetensors", target=4).target == 4
    with pytest.raises(ConfigError, match="does not name its target"):
        load_trigger(tmp_path / "old.safetensors")
    save_file({"pattern": res.pattern, "alpha": torch.ones(2, 2)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ConfigError, match="expected pattern C x h x w"):
        load_trigger(tmp_path / "shape.safetensors", target=4)
    save_file({"pattern": res.pattern * 3, "alpha": res.mask}, str(tmp_path / "range.safetensors"))
    with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
        load_trigger(tmp_path / "range.safetensors", target=4)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ConfigError, match="not a readable safetensors"):
        load_trigger(tmp_path / "junk.safetensors", target=4)


def test_baseline_with_mask_penalises_mask_size(backdoored):
    model, splits, _ = backdoored
    small = PixelBaseline(BaselineConfig(steps=150, restarts=1, with_mask=True, mask_l1=0.05)).fit(
        model, splits.defense, TARGET, torch.Generator().manual_seed(0)
    )
    loose = PixelBaseline(BaselineConfig(steps=150, restarts=1, with_mask=True, mask_l1=0.0)).fit(
        model, splits.defense, TARGET, torch.Generator().manual_seed(0)
    )
    assert float(small.mask.sum()) < float(loose.mask.sum())


def test_baseline_bad_config():
    with pytest.raises(ConfigError, match="baseline.steps=0"):
        BaselineConfig(steps=0)
    with pytest.raises(ConfigError, match="trigger_size"):
        BaselineConfig(trigger_size=[3])


def test_baseline_trigger_larger_than_image(backdoored):
    model, splits, _ = backdoored
    with pytest.raises(ConfigError, match="larger than the image"):
        PixelBaseline(BaselineConfig(trigger_size=[20, 20], steps=1)).fit(model, splits.defense, TARGET, torch.Generator())


def test_ensemble_round_trip_and_same_seed_same_samples(fitted, tmp_path):
    mesa, result = fitted
    path = save_ensemble(mesa, result, tmp_path / "ens", source_model_sha256="abc")
    manifest = json.loads((path / "manifest.json").read_text())
    for key in ("trigger_shape", "levels", "betas", "alpha", "weights", "target_class", "source_model_sha256", "weights_sha256"):
        assert key in manifest
    assert manifest["trigger_shape"] == [1, 3, 3] and manifest["target_class"] == TARGET
    loaded = load_ensemble(path)
    p1, a1 = loaded.sample(64, rng=torch.Generator().manual_seed(5))
    p2, a2 = mesa.sample(64, rng=torch.Generator().manual_seed(5))
    assert torch.equal(p1, p2) and torch.equal(a1, a2)
    p3, _ = loaded.sample(64, rng=torch.Generator().manual_seed(5))
    assert torch.equal(p1, p3)
    assert [p.name for p in tmp_path.iterdir()] == ["ens"]  # no staging leftovers
    assert loaded.position is None  # random placement, as searched


def test_loaded_ensemble_keeps_a_fixed_position(fitted, tmp_path):
    """A moving-window search's triggers live at one place; a defense or the
    endpoint using the loaded artifact must put them there, not anywhere."""
    mesa, result = fitted
    at = dataclasses.replace(result, config={**result.config, "position": [4, 7]})
    loaded = load_ensemble(save_ensemble(mesa, at, tmp_path / "ens"))
    assert loaded.position == (4, 7)


def test_corrupted_ensemble_is_rejected(fitted, tmp_path):
    mesa, result = fitted
    path = save_ensemble(mesa, result, tmp_path / "ens")
    weights = path / "generators.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(EnsembleError, match="sha256"):
        load_ensemble(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(EnsembleError, match="not valid JSON"):
        load_ensemble(path)
    with pytest.raises(EnsembleError, match="no manifest.json"):
        load_ensemble(tmp_path / "nowhere")


def test_mesa_defense_lowers_asr_and_keeps_accuracy(backdoored, fitted):
    model, splits, trigger = backdoored
    mesa, _ = fitted
    cfg = DefenseConfig(epochs=3, rate=0.5, lr=0.01)
    # eval_seed 0: attack_success_rate's own default placements
    res = repair(model, splits.defense, splits.eval, {TARGET: mesa}, cfg, torch.Generator().manual_seed(0), 0, trigger, TARGET)
    acc0, asr0, acc1, asr1 = res.before.clean_accuracy, res.before.asr, res.after.clean_accuracy, res.after.asr
    assert asr0 > 0.9 and asr1 < 0.1, (asr0, asr1)
    assert acc1 >= acc0 - 0.05, (acc0, acc1)
    assert res.after.found_asr < res.before.found_asr
    # the original is untouched
    assert attack_success_rate(model, splits.eval, trigger, TARGET) == asr0


def test_repair_is_clone_retrain_measure_with_the_same_draws(backdoored, fitted):
    """core.repair is the sequence defend, sweep trials and bench/defense ran by hand:
    retrain a copy from the caller's generator, every ASR on fresh eval_seed placements."""
    model, splits, trigger = backdoored
    mesa, _ = fitted
    cfg = DefenseConfig(epochs=1, rate=0.5, lr=0.01)
    res = repair(model, splits.defense, splits.eval, {TARGET: mesa}, cfg, torch.Generator().manual_seed(4), 9, trigger, TARGET)
    by_hand = copy.deepcopy(model)
    losses = retrain(by_hand, splits.defense, [mesa], cfg, torch.Generator().manual_seed(4))
    assert res.losses == losses
    assert res.after.clean_accuracy == clean_accuracy(by_hand, splits.eval)
    assert res.after.asr == attack_success_rate(by_hand, splits.eval, trigger, TARGET, torch.Generator().manual_seed(9))
    assert res.after.found_asr_by_class == {TARGET: sampled_asr(by_hand, splits.eval, mesa, TARGET, torch.Generator().manual_seed(9))}
    assert res.before.asr == attack_success_rate(model, splits.eval, trigger, TARGET, torch.Generator().manual_seed(9))


def test_defense_config_rejects_bad_rate():
    with pytest.raises(ConfigError, match="defense.rate=0"):
        DefenseConfig(rate=0)
    # (retrain with no samplers is plain fine-tuning: tests/test_repair_metrics.py)


def test_several_targets_are_repaired_one_after_another_in_the_given_order(backdoored):
    """Most anomalous first: a flagged class's phase must not start before the
    previous one ends (natural triggers repaired first kept bench/detect's
    irregular backdoor alive), and one progress bar spans the phases."""
    model, splits, _ = backdoored
    calls: list[str] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def sample(self, n, rng=None, level=None):
            calls.append(self.name)
            return torch.rand(n, 1, 3, 3, generator=rng), torch.ones(n, 3, 3)

    seen: list[tuple[int, int]] = []
    cfg = DefenseConfig(epochs=2, batch_size=256, rate=0.5)
    retrain(
        copy.deepcopy(model),
        splits.defense,
        [Recorder("a"), Recorder("b")],
        cfg,
        torch.Generator().manual_seed(0),
        lambda step, total, loss: seen.append((step, total)),
    )
    k = calls.index("b")
    assert calls[:k] == ["a"] * k and calls[k:] == ["b"] * (len(calls) - k), calls
    steps = -(-len(splits.defense) // 256) * 2  # ceil(n / batch) * epochs, split between the two phases
    assert abs(k - steps / 2) <= 1, (k, steps)
    assert [s for s, _ in seen] == list(range(1, steps + 1)) and {t for _, t in seen} == {steps}
