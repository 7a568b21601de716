"""BackdoorBench's repair metrics (robust accuracy, DER) on hand-made models whose
answers are known exactly, and plain fine-tuning (retrain with no samplers)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gdm_ray.core.data import DataSpec, ImageSet, load_splits
from gdm_ray.core.defense import DefenseConfig, retrain
from gdm_ray.core.metrics import (
    asr_and_robust_accuracy,
    attack_success_rate,
    defense_effectiveness_rating,
    robust_accuracy,
)
from gdm_ray.core.models import build_model
from gdm_ray.core.train import train_classifier
from gdm_ray.core.triggers import Trigger

K, H, W, TARGET = 4, 4, 4, 2


def _labelled(n: int = 203) -> ImageSet:
    """Dark 4x4 images whose class is written in the top-left pixel (label / 10); 203 images: batches don't divide it."""
    y = torch.arange(n) % K
    x = torch.zeros(n, 1, H, W)
    x[:, 0, 0, 0] = y.float() / 10
    return ImageSet(x, y, [str(k) for k in range(K)])


def _one_hot(k: torch.Tensor) -> torch.Tensor:
    return nn.functional.one_hot(k.long(), K).float() * 10


class Backdoored(nn.Module):
    """Says TARGET whenever a pixel is bright (the trigger), else the class in the top-left pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x > 0.9).flatten(1).any(1)
        return _one_hot(torch.where(bright, TARGET, (x[:, 0, 0, 0] * 10).round().long()))


class ReadsLabel(nn.Module):
    """Ignores the trigger: the class in the top-left pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _one_hot((x[:, 0, 0, 0] * 10).round().long().clamp(0, K - 1))


class TopHalf(nn.Module):
    """Backdoored only where the trigger lands in the top two rows; the true class elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x[:, :, :2] > 0.9).flatten(1).any(1)
        return _one_hot(torch.where(bright, TARGET, (x[:, 0, 0, 0] * 10).round().long()))


def _white_pixel(placement: str = "random") -> Trigger:
    return Trigger(torch.ones(1, 1, 1), torch.ones(1, 1), placement, row=3, col=3)


def test_robust_accuracy_is_zero_for_a_backdoor_that_always_fires():
    data = _labelled()
    g = torch.Generator().manual_seed(0)
    assert robust_accuracy(Backdoored(), data, _white_pixel(), TARGET, g) == 0.0
    assert attack_success_rate(Backdoored(), data, _white_pixel(), TARGET, torch.Generator().manual_seed(0)) == 1.0


def test_robust_accuracy_is_one_for_a_model_the_trigger_does_not_move():
    data = _labelled()
    for placement in ("fixed", "random"):  # random: the pixel sometimes lands on the label pixel and reads 1.0 -> class 10 clamped
        racc = robust_accuracy(ReadsLabel(), data, _white_pixel(placement), TARGET, torch.Generator().manual_seed(1), batch_size=50)
        if placement == "fixed":
            assert racc == 1.0
        else:
            assert 0.8 < racc < 1.0
    # on the clean images of other classes it is plain accuracy: the trigger is what R-Acc adds
    clean = robust_accuracy(Backdoored(), data, Trigger(torch.zeros(1, 1, 1), torch.zeros(1, 1)), TARGET, torch.Generator())
    assert clean == 1.0


@pytest.mark.parametrize("batch_size", [512, 50, 7])
def test_robust_accuracy_sees_the_asr_placements(batch_size):
    """TopHalf: a placement in rows 0-1 is an attack success, anywhere else a robust
    hit, so with the same seed R-Acc = 1 - ASR exactly, and both equal the share of
    placements (drawn batch by batch, as the metrics draw them) that land low."""
    data, trig = _labelled(), _white_pixel()
    keep = int((data.y != TARGET).sum())
    g = torch.Generator().manual_seed(5)
    rows = torch.cat([trig.positions(min(batch_size, keep - i), (H, W), g)[:, 0] for i in range(0, keep, batch_size)])
    low = int((rows >= 2).sum()) / keep
    racc = robust_accuracy(TopHalf(), data, trig, TARGET, torch.Generator().manual_seed(5), batch_size)
    asr = attack_success_rate(TopHalf(), data, trig, TARGET, torch.Generator().manual_seed(5), batch_size)
    assert 0.2 < racc < 0.8 and racc == low and asr + racc == pytest.approx(1.0, abs=1e-12)
    assert asr_and_robust_accuracy(TopHalf(), data, trig, TARGET, torch.Generator().manual_seed(5), batch_size) == (asr, racc)
    # another seed, other placements
    assert robust_accuracy(TopHalf(), data, trig, TARGET, torch.Generator().manual_seed(6), batch_size) != racc


def test_robust_accuracy_of_nothing_but_target_images_is_nan():
    data = _labelled()
    only = ImageSet(data.x[data.y == TARGET], data.y[data.y == TARGET], data.classes)
    assert math.isnan(robust_accuracy(Backdoored(), only, _white_pixel(), TARGET, torch.Generator()))


@pytest.mark.parametrize(
    "asr_before, asr_after, acc_before, acc_after, der",
    [
        (0.98, 0.02, 0.90, 0.88, (0.96 - 0.02 + 1) / 2),  # the usual repair: most of the ASR for a little accuracy
        (1.0, 0.0, 0.9, 0.9, 1.0),  # everything removed at no cost
        (0.5, 0.5, 0.9, 0.9, 0.5),  # nothing changed
        (0.9, 0.1, 0.80, 0.85, (0.8 + 1) / 2),  # an accuracy gain does not count
        (0.2, 0.6, 0.9, 0.7, (0 - 0.2 + 1) / 2),  # an ASR rise does not count, the accuracy lost does
        (0.3, 0.9, 0.5, 0.9, 0.5),  # both the wrong way round: no credit, no penalty
        (0.0, 0.0, 1.0, 0.0, 0.0),  # the worst: no ASR removed, all accuracy lost
    ],
)
def test_der_on_hand_computed_cases(asr_before, asr_after, acc_before, acc_after, der):
    assert defense_effectiveness_rating(asr_before, asr_after, acc_before, acc_after) == pytest.approx(der, abs=1e-12)


def test_der_refuses_percentages_and_passes_nan():
    with pytest.raises(ValueError, match="fractions"):
        defense_effectiveness_rating(98.0, 2.0, 90.0, 88.0)
    assert math.isnan(defense_effectiveness_rating(float("nan"), 0.1, 0.9, 0.9))


def test_retrain_with_no_samplers_is_plain_training_for_the_full_budget():
    """The fine-tuning floor: one phase, every epoch, no batch hook, one progress bar."""
    splits = load_splits(DataSpec(name="synthetic", samples=400, num_classes=3, image_size=[8, 8], seed=1))
    torch.manual_seed(0)
    model = build_model("small_cnn", 1, 3, 4)
    cfg = DefenseConfig(epochs=2, batch_size=64, lr=0.05, rate=0.3)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    seen: list[tuple[int, int]] = []
    losses = retrain(a, splits.defense, [], cfg, torch.Generator().manual_seed(2), lambda s, t, _: seen.append((s, t)))
    assert losses == train_classifier(b, splits.defense, cfg.train_config(), torch.Generator().manual_seed(2))
    assert len(losses) == 2 and all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in a.state_dict().items())
    steps = -(-len(splits.defense) // 64) * 2
    assert [s for s, _ in seen] == list(range(1, steps + 1)) and {t for _, t in seen} == {steps}
