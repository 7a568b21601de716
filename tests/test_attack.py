"""BadNets poisoning, training determinism, and the clean-accuracy / ASR metrics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.functional import avg_pool2d, one_hot

from gdm_ray.core.attack import BadNets
from gdm_ray.core.data import ImageSet, Splits
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.metrics import attack_success_rate, clean_accuracy, predict
from gdm_ray.core.models import build_model
from gdm_ray.core.train import TrainConfig, train_classifier
from gdm_ray.core.triggers import Trigger, TriggerSpec, make_trigger

TARGET = 1
CFG = TrainConfig(epochs=4, batch_size=64, lr=0.05)


@pytest.fixture(scope="module")
def trigger() -> Trigger:
    # bits 0, 2, 4, 6, 8: an "X" of white pixels on black, at a random place per image
    return make_trigger(TriggerSpec(family="bw3x3", number=341, placement="random"), 1, (16, 16))


def _fresh_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # weight init (and dropout) use the global generator
    return build_model("small_cnn", 1, 4, width=8)


@pytest.fixture(scope="module")
def backdoored(synthetic_splits: Splits, trigger: Trigger):
    model = _fresh_model(0)
    result = BadNets(trigger, TARGET, rate=0.2).fit(
        model, synthetic_splits.train, synthetic_splits.eval, CFG, torch.Generator().manual_seed(0)
    )
    return model, result


@pytest.fixture(scope="module")
def clean(synthetic_splits: Splits, trigger: Trigger):
    """Trained the same way, without poisoning (rate 0 = no batch hook)."""
    model = _fresh_model(0)
    result = BadNets(trigger, TARGET, rate=0.0).fit(
        model, synthetic_splits.train, synthetic_splits.eval, CFG, torch.Generator().manual_seed(0)
    )
    return model, result


# --- BadNets ---------------------------------------------------------------------


def test_badnets_implants_backdoor(backdoored, synthetic_splits, trigger):
    model, result = backdoored
    assert result.asr >= 0.9
    assert result.clean_accuracy >= 0.8  # chance is 0.25
    assert result.train_seconds > 0
    assert len(result.losses) == 4 and all(math.isfinite(v) for v in result.losses)
    assert result.losses[-1] < result.losses[0]
    # the result's numbers are the metrics of the returned model
    assert clean_accuracy(model, synthetic_splits.eval) == pytest.approx(result.clean_accuracy)
    asr = attack_success_rate(model, synthetic_splits.eval, trigger, TARGET, torch.Generator().manual_seed(99))
    assert asr >= 0.9


def test_clean_model_has_low_asr(clean, backdoored, synthetic_splits, trigger):
    model, result = clean
    assert result.clean_accuracy >= 0.8
    assert result.asr <= 0.2
    assert result.asr < backdoored[1].asr - 0.6


def test_fine_tuning_a_clean_model_implants_backdoor(clean, synthetic_splits, trigger):
    clean_model, clean_result = clean
    model = copy.deepcopy(clean_model)
    before = copy.deepcopy(clean_model.state_dict())
    torch.manual_seed(5)
    result = BadNets(trigger, TARGET, rate=0.2).fit(
        model,
        synthetic_splits.train,
        synthetic_splits.eval,
        TrainConfig(epochs=3, batch_size=64, lr=0.05),
        torch.Generator().manual_seed(5),
    )
    assert clean_result.asr <= 0.2
    assert result.asr >= 0.9
    assert result.clean_accuracy >= 0.8
    # fine-tuning changed the copy's weights, not the clean model's
    assert not torch.equal(model.head[-1].weight, clean_model.head[-1].weight)
    for k, v in clean_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_rate_zero_is_plain_training(synthetic_splits, trigger):
    small = synthetic_splits.train.subset(torch.arange(192))
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05)
    a = _fresh_model(3)
    BadNets(trigger, TARGET, rate=0.0).fit(a, small, synthetic_splits.eval, cfg, torch.Generator().manual_seed(3))
    b = _fresh_model(3)
    train_classifier(b, small, cfg, torch.Generator().manual_seed(3))
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name


def test_same_seed_same_weights(synthetic_splits, trigger):
    small = synthetic_splits.train.subset(torch.arange(256))
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05)

    def run(seed: int) -> dict[str, torch.Tensor]:
        model = _fresh_model(seed)
        BadNets(trigger, TARGET, rate=0.3).fit(model, small, synthetic_splits.eval, cfg, torch.Generator().manual_seed(seed))
        return model.state_dict()

    first, second, other = run(7), run(7), run(8)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


@pytest.mark.parametrize(
    ("schedule", "steps"),
    [("onecycle", 1), ("onecycle", 2), ("onecycle", 3), ("onecycle", 4), ("onecycle", 5), ("cosine", 4), ("constant", 4)],
)
def test_short_trainings(synthetic_splits, schedule, steps):
    """A handful of optimiser steps (a tiny defense set) trains without error under every schedule
    (OneCycleLR used to divide by zero at exactly 4 steps)."""
    data = synthetic_splits.train.subset(torch.arange(16 * steps))
    model = _fresh_model(steps)
    before = model.head[-1].weight.detach().clone()
    calls: list[int] = []
    losses = train_classifier(
        model,
        data,
        TrainConfig(epochs=1, batch_size=16, lr=0.05, schedule=schedule),
        torch.Generator().manual_seed(0),
        progress=lambda step, total, loss: calls.append(total),
    )
    assert calls == [steps] * steps
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert not torch.equal(model.head[-1].weight, before)


def test_poison_batch(trigger):
    g = torch.Generator().manual_seed(0)
    x = torch.full((400, 1, 16, 16), 0.5)
    y = torch.zeros(400, dtype=torch.long)
    px, py = BadNets(trigger, 3, rate=0.25).poison_batch(x, y, g)
    poisoned = py == 3
    assert 60 < int(poisoned.sum()) < 140  # about a quarter
    assert torch.equal(x, torch.full((400, 1, 16, 16), 0.5)), "the input batch is not modified in place"
    assert torch.equal(px[~poisoned], x[~poisoned])
    changed = (px != x).flatten(1).sum(1)
    assert torch.equal(changed[poisoned], torch.full((int(poisoned.sum()),), 9))  # every 3x3 pixel is 0 or 1, not 0.5
    all_px, all_py = BadNets(trigger, 3, rate=1.0).poison_batch(x, y, g)
    assert bool((all_py == 3).all())
    none_px, none_py = BadNets(trigger, 3, rate=0.0).poison_batch(x, y, g)
    assert torch.equal(none_px, x) and torch.equal(none_py, y)


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("inf")])
def test_rate_out_of_range(trigger, rate):
    with pytest.raises(ConfigError, match=f"attack.rate={rate}"):
        BadNets(trigger, 0, rate=rate)


def test_target_out_of_range(trigger, synthetic_splits):
    with pytest.raises(ConfigError, match="attack.target_class=-1"):
        BadNets(trigger, -1)
    attack = BadNets(trigger, 4, rate=0.1)  # classes are 0..3
    model = _fresh_model(0)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="attack.target_class=4"):
        attack.fit(model, synthetic_splits.train, synthetic_splits.eval, CFG, torch.Generator().manual_seed(0))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), "nothing trained before the error"


# --- metrics on hand-made models -------------------------------------------------

K = 4


def _labelled_images(n: int = 20, hw: int = 8) -> ImageSet:
    """Pixel (0, 0) encodes the label as label/10; labels 0,1,2,3,0,1,... (5 of each for n=20)."""
    y = torch.arange(n) % K
    x = torch.zeros(n, 1, hw, hw)
    x[:, 0, 0, 0] = y.float() / 10
    return ImageSet(x, y, [f"c{i}" for i in range(K)])


def _read_label(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0, 0, 0] * 10).round().long()


class Always(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return one_hot(torch.full((x.shape[0],), self.k), K).float()


class LabelReader(nn.Module):
    """A perfect classifier for _labelled_images that ignores triggers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return one_hot(_read_label(x), K).float()


class CornerBackdoor(nn.Module):
    """Predicts the label, except: a white bottom-right pixel sends classes 0, 1 and 2 to class 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = _read_label(x)
        pred = torch.where((x[:, 0, -1, -1] > 0.99) & (label != 3), torch.full_like(label, 2), label)
        return one_hot(pred, K).float()


class PatchDetector(nn.Module):
    """Predicts 2 wherever a fully white 3x3 patch appears (anywhere), else 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        white = avg_pool2d(x[:, :1], 3, stride=1).flatten(1).amax(1) > 0.999
        return one_hot(torch.where(white, 2, 0), K).float()


def _corner_trigger() -> Trigger:
    return Trigger(torch.ones(1, 1, 1), torch.ones(1, 1), placement="fixed", row=-1, col=-1)


def test_clean_accuracy_exact():
    data = _labelled_images()
    assert clean_accuracy(Always(2), data) == 0.25
    assert clean_accuracy(LabelReader(), data) == 1.0
    assert clean_accuracy(CornerBackdoor(), data) == 1.0
    data.y[:3] = 3  # images 0, 1, 2 (labels 0, 1, 2) relabelled: the reader now misses exactly 3
    assert clean_accuracy(LabelReader(), data) == pytest.approx(17 / 20)
    assert math.isnan(clean_accuracy(LabelReader(), data.subset(torch.arange(0))))


def test_asr_exact_and_excludes_target_class():
    data = _labelled_images()
    trig = _corner_trigger()
    # a constant model "succeeds" on every non-target image, and never for another target
    assert attack_success_rate(Always(2), data, trig, target=2) == 1.0
    assert attack_success_rate(Always(2), data, trig, target=1) == 0.0
    # a model that ignores the trigger: 0, although a quarter of all images are class 1
    assert attack_success_rate(LabelReader(), data, trig, target=1) == 0.0
    # the backdoor works on classes 0 and 1 but not 3: 10 of the 15 non-target images
    assert attack_success_rate(CornerBackdoor(), data, trig, target=2) == pytest.approx(10 / 15)
    # batching does not change the count (batch of 4 leaves a partial last batch)
    assert attack_success_rate(CornerBackdoor(), data, trig, target=2, batch_size=4) == pytest.approx(10 / 15)
    # only target-class images: undefined
    only_target = data.subset(data.y == 2)
    assert math.isnan(attack_success_rate(Always(2), only_target, trig, target=2))


def test_asr_random_placement():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(30, 1, 10, 12, generator=g) * 0.9  # no white patch anywhere
    data = ImageSet(x, torch.arange(30) % K, [f"c{i}" for i in range(K)])
    white = Trigger(torch.ones(1, 3, 3), torch.ones(3, 3), placement="random")
    grey = Trigger(torch.full((1, 3, 3), 0.5), torch.ones(3, 3), placement="random")
    assert clean_accuracy(PatchDetector(), data) == pytest.approx(8 / 30)  # class 0 only
    assert attack_success_rate(PatchDetector(), data, white, 2, torch.Generator().manual_seed(1)) == 1.0
    assert attack_success_rate(PatchDetector(), data, grey, 2, torch.Generator().manual_seed(1)) == 0.0
    # and the data itself is not modified by the metric
    assert torch.equal(data.x, x)


def test_predict_restores_mode_and_batches():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.Dropout(0.9))
    model.train()
    x = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    p_full = predict(model, x)
    p_small = predict(model, x, batch_size=3)
    assert model.training
    assert torch.equal(p_full, p_small)  # eval mode: dropout off, so deterministic
    with torch.no_grad():
        expected = model[1](x.flatten(1)).argmax(1)
    assert torch.equal(p_full, expected)
    assert predict(model, x[:0]).shape == (0,)
