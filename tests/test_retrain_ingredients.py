"""What a repair can do to keep clean accuracy: distillation from the
original model and frozen BatchNorm statistics (gdm_ray.core.train)."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from gdm_ray.core.data import make_synthetic
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.model_io import clone_model
from gdm_ray.core.models import build_model
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
