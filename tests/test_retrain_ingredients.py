"""What a repair can do to keep clean accuracy: distillation from the
original model, frozen BatchNorm statistics (gdm_ray.core.train) and the
stopping epoch chosen on held-out clean images (gdm_ray.core.selection)."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from gdm_ray.core.data import make_synthetic
from gdm_ray.core.defense import DefenseConfig
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.model_io import clone_model
from gdm_ray.core.models import build_model
from gdm_ray.core.repair import repair
from gdm_ray.core.selection import EpochPicker, holdout_split
from gdm_ray.core.train import TrainConfig, train_classifier

CFG = TrainConfig(epochs=1, batch_size=64, lr=0.05, schedule="constant", channels_last=False)


def _model_and_data():
    data = make_synthetic(n=256, num_classes=4, image_size=(16, 16), seed=0)
    torch.manual_seed(0)
    return build_model("small_cnn", 1, 4, width=4), data


def _bn_stats(model: torch.nn.Module) -> list[torch.Tensor]:
    return [b.clone() for name, b in model.named_buffers() if "running_mean" in name or "running_var" in name]


def test_frozen_batchnorm_keeps_the_statistics_also_in_a_torchscript_model():
    model, data = _model_and_data()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    buf.seek(0)
    for m in (model, torch.jit.load(buf)):
        before = _bn_stats(m)
        train_classifier(m, data, dataclasses.replace(CFG, batchnorm="frozen"), torch.Generator().manual_seed(0))
        assert all(torch.equal(a, b) for a, b in zip(before, _bn_stats(m)))
        assert m.training  # the model's own mode is restored
        train_classifier(m, data, CFG, torch.Generator().manual_seed(0))
        assert not all(torch.equal(a, b) for a, b in zip(before, _bn_stats(m)))


def test_distillation_changes_the_training_and_needs_a_teacher():
    model, data = _model_and_data()
    teacher = clone_model(model).eval()
    plain, taught, no_teacher = clone_model(model), clone_model(model), clone_model(model)
    cfg = dataclasses.replace(CFG, distill=1.0)
    train_classifier(plain, data, CFG, torch.Generator().manual_seed(0))
    train_classifier(taught, data, cfg, torch.Generator().manual_seed(0), teacher=teacher)
    train_classifier(no_teacher, data, cfg, torch.Generator().manual_seed(0))  # distill without a teacher: off
    w = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    assert torch.equal(w(plain), w(no_teacher))
    assert not torch.allclose(w(plain), w(taught))


@pytest.mark.parametrize("kw, msg", [({"batchnorm": "off"}, "train.batchnorm='off'"), ({"distill": -1}, "train.distill=-1"),
                                     ({"temperature": 0}, "train.temperature=0")])  # fmt: skip
def test_train_config_checks_the_ingredients(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(**kw)


class _FixedTrigger:
    """A found-trigger stand-in: the same white 3x3 square every draw."""

    def sample(self, n, rng=None, level=None):
        return torch.ones(n, 1, 3, 3), torch.ones(n, 3, 3)


def test_holdout_split_is_disjoint_seeded_and_checks_its_share():
    data = make_synthetic(n=100, num_classes=4, image_size=(8, 8), seed=0)
    fit, held = holdout_split(data, 0.2, torch.Generator().manual_seed(0))
    assert (len(fit), len(held)) == (80, 20)
    again = holdout_split(data, 0.2, torch.Generator().manual_seed(0))[1]
    assert torch.equal(held.x, again.x)
    rows = lambda s: {tuple(r.flatten().tolist()) for r in s.x}  # noqa: E731
    assert not rows(fit) & rows(held)
    with pytest.raises(ConfigError, match="defense.holdout=0.001"):
        holdout_split(data, 0.001, torch.Generator())
    with pytest.raises(ConfigError, match="defense.holdout=1.5"):
        DefenseConfig(holdout=1.5)


def test_epoch_picker_puts_the_best_epochs_weights_back():
    model, data = _model_and_data()
    train_classifier(model, data, CFG, torch.Generator().manual_seed(0))
    good = [t.clone() for t in model.state_dict().values()]
    picker = EpochPicker(model, data, {0: _FixedTrigger()}, seed=0)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.eval()  # as defense.batchnorm=frozen leaves it while the rest trains
    picker()
    assert model.training and not bn.training
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # every image gets the same answer: accuracy near chance
    picker()
    assert picker.epochs[1]["clean_accuracy"] < picker.epochs[0]["clean_accuracy"]
    picker.restore()
    assert all(torch.equal(a, b) for a, b in zip(good, model.state_dict().values()))
    assert picker.summary()["chosen_epoch"] == 1 and len(picker.summary()["epochs"]) == 2


def test_repair_with_a_holdout_records_its_choice_and_leaves_the_default_alone():
    model, data = _model_and_data()
    cfg = DefenseConfig(epochs=2, batch_size=64, lr=0.01)
    plain = repair(model, data, data, {0: _FixedTrigger()}, cfg, torch.Generator().manual_seed(0), 1)
    assert plain.selection is None
    held = repair(model, data, data, {0: _FixedTrigger()}, dataclasses.replace(cfg, holdout=0.25), torch.Generator().manual_seed(0), 1)
    sel = held.selection
    assert sel["holdout_images"] == 64 and [e["epoch"] for e in sel["epochs"]] == [1, 2]
    assert sel["chosen_epoch"] in (1, 2)
    best = max(e["score"] for e in sel["epochs"])
    assert sel["epochs"][sel["chosen_epoch"] - 1]["score"] == best


def test_append_mix_keeps_every_clean_image_and_adds_triggered_copies():
    from gdm_ray.core.defense import _trigger_hook

    x = torch.zeros(64, 1, 8, 8)
    y = torch.arange(64) % 4
    hook = _trigger_hook(_FixedTrigger(), 0.5, (1, 8, 8), append=True)
    out_x, out_y, source = hook(x, y, torch.Generator().manual_seed(0))
    k = len(out_x) - 64
    assert 10 < k < 54  # about half the images got a triggered copy
    assert torch.equal(out_x[:64], x)  # the clean batch is untouched
    assert torch.equal(out_y, y[source]) and torch.equal(source[:64], torch.arange(64))
    assert (out_x[64:].flatten(1).sum(1) == 9).all()  # each copy carries the 3x3 trigger
    # replace (the default) swaps the same share in place: the batch keeps its size
    rx, ry = _trigger_hook(_FixedTrigger(), 0.5, (1, 8, 8))(x, y, torch.Generator().manual_seed(0))
    assert rx.shape == x.shape and torch.equal(ry, y) and int((rx.flatten(1).sum(1) == 9).sum()) == k


def test_append_mix_trains_with_distillation_and_is_checked():
    model, data = _model_and_data()
    cfg = DefenseConfig(epochs=1, batch_size=64, lr=0.01, mix="append", distill=1.0, lr_probe_steps=0)
    fixed = repair(model, data, data, {0: _FixedTrigger()}, cfg, torch.Generator().manual_seed(0), 1, measure_before=False)
    assert len(fixed.losses) == 1 and fixed.losses[0] > 0
    with pytest.raises(ConfigError, match="defense.mix='both'"):
        DefenseConfig(mix="both")
