"""The core repair workflow (gdm_ray.core.repair) on a small synthetic backdoor."""

from __future__ import annotations

import pytest
import torch

from gdm_ray.core.attack import BadNets
from gdm_ray.core.baseline import BaselineConfig, PixelBaseline
from gdm_ray.core.data import DataSpec, load_splits
from gdm_ray.core.defense import DefenseConfig
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.mesa import MESA, MESAConfig
from gdm_ray.core.metrics import EVAL_SEED_OFFSET
from gdm_ray.core.models import build_model
from gdm_ray.core.repair import Measurement, RepairResult, Search, measure, repair, search_triggers
from gdm_ray.core.train import TrainConfig
from gdm_ray.core.triggers import TriggerSpec, make_trigger

TARGET = 1
SEED = 3
MESA_CFG = MESAConfig(trigger_size=[3, 3], restarts=0, steps=60, log_every=30, eval_samples=64, levels=2)
BASE_CFG = BaselineConfig(steps=40, restarts=1)
DEFENSE = DefenseConfig(epochs=1, batch_size=64)


@pytest.fixture(scope="module")
def backdoored():
    splits = load_splits(DataSpec(name="synthetic", samples=1200, num_classes=3, image_size=[12, 12], seed=3))
    trigger = make_trigger(TriggerSpec(family="bw3x3", number=341), 1, (12, 12))
    torch.manual_seed(0)  # weight init uses the global RNG, whose state depends on the tests run before
    model = build_model("small_cnn", 1, 3, 8)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, channels_last=False)
    BadNets(trigger, TARGET, 0.2).fit(model, splits.train, splits.eval, cfg, torch.Generator().manual_seed(0))
    model.eval()
    return model, splits, trigger


def _search_and_repair(backdoored, method: str, seed: int = SEED, real: bool = True) -> tuple[Search, RepairResult]:
    """As defend does it: one generator through the search, then the retraining."""
    model, splits, trigger = backdoored
    rng = torch.Generator().manual_seed(seed)
    found = search_triggers(method, model, splits.defense, TARGET, MESA_CFG, BASE_CFG, rng)
    res = repair(
        model,
        splits.defense,
        splits.eval,
        {TARGET: found.sampler},
        DEFENSE,
        rng,
        seed + EVAL_SEED_OFFSET,
        trigger if real else None,
        TARGET if real else None,
    )
    return found, res


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_repair_result_fields_and_the_original_is_untouched(backdoored):
    model = backdoored[0]
    original = _state(model)
    found, res = _search_and_repair(backdoored, "mesa")
    assert isinstance(found.sampler, MESA) and found.mesa is not None and found.baseline is None and found.seconds > 0
    assert found.method == "mesa" and found.target_class == TARGET and found.mesa.generators.levels == 2
    assert res.targets == [TARGET]
    assert isinstance(res.before, Measurement) and isinstance(res.after, Measurement)
    for m in (res.before, res.after):
        assert 0.0 <= m.clean_accuracy <= 1.0 and m.asr is not None and 0.0 <= m.asr <= 1.0
        assert set(m.found_asr_by_class) == {TARGET} and m.found_asr == m.found_asr_by_class[TARGET]
    assert res.retrain_seconds > 0 and res.losses
    assert res.repaired is not model
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # retraining changed the copy only
    assert any(not torch.equal(v, original[k]) for k, v in res.repaired.state_dict().items())
    d = res.before.as_dict()
    assert set(d) == {"clean_accuracy", "asr", "robust_accuracy", "found_asr_by_class", "found_asr"}
    assert list(d["found_asr_by_class"]) == [str(TARGET)]
    for m in (res.before, res.after):  # the real trigger's R-Acc, on the ASR's placements: the two cannot overlap
        assert m.robust_accuracy is not None and 0.0 <= m.robust_accuracy and m.robust_accuracy + m.asr <= 1.0 + 1e-12
    # (how well this fixture's 1-epoch repair works varies: its model is not seeded; test_search_cli checks the figures)
    assert res.der == (max(0, res.before.asr - res.after.asr) - max(0, res.before.clean_accuracy - res.after.clean_accuracy) + 1) / 2
    assert 0.0 <= res.der <= 1.0


def test_same_seed_same_result_and_unknown_real_trigger(backdoored):
    fa, a = _search_and_repair(backdoored, "baseline")
    fb, b = _search_and_repair(backdoored, "baseline", real=False)
    assert isinstance(fa.sampler, PixelBaseline) and fa.baseline is not None and fa.mesa is None
    assert torch.equal(fa.baseline.pattern, fb.baseline.pattern)
    assert a.before.found_asr == b.before.found_asr and a.after.clean_accuracy == b.after.clean_accuracy
    assert a.after.found_asr_by_class == b.after.found_asr_by_class and a.losses == b.losses
    assert all(torch.equal(v, b.repaired.state_dict()[k]) for k, v in a.repaired.state_dict().items())
    assert a.before.asr is not None and b.before.asr is None and b.after.asr is None and b.before.as_dict()["asr"] is None
    assert a.der is not None and b.der is None and b.before.robust_accuracy is None and b.after.as_dict()["robust_accuracy"] is None
    _, c = _search_and_repair(backdoored, "baseline", seed=SEED + 1)
    assert c.losses != a.losses  # the seed reaches the search and the retraining


def test_measurements_are_on_fixed_placements_and_before_can_be_skipped(backdoored):
    model, splits, trigger = backdoored
    found = search_triggers("baseline", model, splits.defense, TARGET, MESA_CFG, BASE_CFG, torch.Generator().manual_seed(0))
    one = measure(model, splits.eval, {TARGET: found.sampler}, 11, trigger, TARGET)
    assert one == measure(model, splits.eval, {TARGET: found.sampler}, 11, trigger, TARGET)
    res = repair(
        model, splits.defense, splits.eval, {TARGET: found.sampler}, DEFENSE, torch.Generator().manual_seed(0), 11, measure_before=False
    )
    assert res.before is None and res.after.asr is None and set(res.after.found_asr_by_class) == {TARGET} and res.der is None


def test_bad_requests_are_config_errors(backdoored):
    model, splits, _ = backdoored
    with pytest.raises(ConfigError, match="method='nope'"):
        search_triggers("nope", model, splits.defense, TARGET, MESA_CFG, BASE_CFG, torch.Generator())
    with pytest.raises(ConfigError, match="at least one class"):
        repair(model, splits.defense, splits.eval, {}, DEFENSE, torch.Generator(), 0)
    with pytest.raises(ConfigError, match="no samplers"):
        repair(model, splits.defense, splits.eval, {TARGET: object()}, DEFENSE, torch.Generator(), 0, finetune=True)  # type: ignore[dict-item]


def test_finetune_searches_nothing_and_retrains_on_clean_images_only(backdoored):
    """The floor: the same clean data and DefenseConfig budget, no search, no triggers."""
    model, splits, trigger = backdoored
    original = _state(model)
    rng = torch.Generator().manual_seed(SEED)
    state = rng.get_state()
    found = search_triggers("finetune", model, splits.defense, TARGET, None, None, rng)
    assert found.method == "finetune" and found.sampler is None and found.mesa is None and found.baseline is None
    assert found.seconds < 0.01 and torch.equal(rng.get_state(), state)  # nothing searched, nothing drawn
    res = repair(model, splits.defense, splits.eval, {}, DEFENSE, rng, SEED + EVAL_SEED_OFFSET, trigger, TARGET, finetune=True)
    assert res.targets == [] and res.losses and len(res.losses) == DEFENSE.epochs and res.retrain_seconds > 0
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(v, original[k]) for k, v in res.repaired.state_dict().items())
    for m in (res.before, res.after):
        assert m.found_asr_by_class == {} and m.found_asr is None and m.asr is not None and m.robust_accuracy is not None
    # before: the backdoored model itself, measured as the other methods measure it
    _, other = _search_and_repair(backdoored, "baseline")
    assert (res.before.clean_accuracy, res.before.asr, res.before.robust_accuracy) == (
        other.before.clean_accuracy,
        other.before.asr,
        other.before.robust_accuracy,
    )
    assert res.before.asr > 0.5 and res.der is not None and 0.0 <= res.der <= 1.0  # the fixture is backdoored (how strongly varies)
