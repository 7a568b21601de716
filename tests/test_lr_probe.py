"""The retraining-rate probe (core/lr_probe.py): a rate that wrecks the model is
refused before the retraining, one it takes is kept, and the probe leaves the
retraining's own draws alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gdm_ray.core.data import DataSpec, load_splits
from gdm_ray.core.defense import DefenseConfig
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.lr_probe import probe_lr
from gdm_ray.core.metrics import clean_accuracy
from gdm_ray.core.models import build_model
from gdm_ray.core.repair import repair
from gdm_ray.core.train import TrainConfig, train_classifier


@pytest.fixture(scope="module")
def trained():
    splits = load_splits(DataSpec(name="synthetic", samples=1500, num_classes=4, image_size=[12, 12], seed=5))
    torch.manual_seed(0)
    model = build_model("small_cnn", 1, 4, 8)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, channels_last=False)
    train_classifier(model, splits.train, cfg, torch.Generator().manual_seed(0))
    model.eval()
    assert clean_accuracy(model, splits.eval) > 0.8
    return model, splits


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def test_a_rate_that_wrecks_the_model_is_lowered(trained):
    model, splits = trained
    w0 = _weights(model)
    cfg = DefenseConfig(lr=10.0, lr_probe_steps=15, batch_size=64)
    out = probe_lr(model, splits.defense, [], cfg, seed=3)
    first = out["trials"][0]
    assert first["lr"] == 10.0 and first["accuracy"] < out["accuracy_before"] - 0.05
    assert out["lr"] < 10.0 and out["kept"]
    assert out["trials"][-1]["lr"] == out["lr"] and out["trials"][-1]["accuracy"] >= out["accuracy_before"] - 0.05
    assert all(torch.equal(a, b) for a, b in zip(w0, model.state_dict().values())), "the probe trains copies only"


def test_no_rate_within_tolerance_picks_the_best_and_says_so(trained):
    model, splits = trained
    out = probe_lr(model, splits.defense, [], DefenseConfig(lr=1e4, lr_probe_steps=10, lr_probe_tolerance=0.0), seed=3)
    assert not out["kept"] and len(out["trials"]) == 4
    assert out["lr"] == max(out["trials"], key=lambda t: t["accuracy"])["lr"]


def test_a_rate_the_model_takes_retrains_exactly_as_without_the_probe(trained):
    model, splits = trained
    cfg = DefenseConfig(lr=0.01, epochs=1, batch_size=64)
    on = repair(model, splits.defense, splits.eval, {}, cfg, torch.Generator().manual_seed(1), 7, finetune=True, measure_before=False)
    off = repair(
        model, splits.defense, splits.eval, {}, dataclasses.replace(cfg, lr_probe_steps=0), torch.Generator().manual_seed(1), 7,
        finetune=True, measure_before=False,
    )  # fmt: skip
    assert on.lr_probe["lr"] == 0.01 and on.lr_probe["kept"] and len(on.lr_probe["trials"]) == 1
    assert off.lr_probe is None
    assert all(torch.equal(a, b) for a, b in zip(on.repaired.state_dict().values(), off.repaired.state_dict().values()))


def test_a_lowered_rate_is_the_one_the_retraining_uses(trained):
    model, splits = trained
    cfg = DefenseConfig(lr=10.0, epochs=1, batch_size=64, lr_probe_steps=15)
    fixed = repair(model, splits.defense, splits.eval, {}, cfg, torch.Generator().manual_seed(1), 3, finetune=True)
    assert fixed.lr_probe["lr"] < 10.0
    assert fixed.after.clean_accuracy > fixed.before.clean_accuracy - 0.1  # lr 10 would have wrecked it


BAD = [({"lr_probe_steps": -1}, "lr_probe_steps=-1"), ({"lr_probe_tolerance": 2}, "lr_probe_tolerance=2")]


@pytest.mark.parametrize(("over", "name"), BAD)
def test_bad_probe_settings_are_named(over, name):
    with pytest.raises(ConfigError, match=name):
        DefenseConfig(**over)
