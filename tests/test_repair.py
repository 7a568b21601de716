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
from gdm_ray.core.repair import Measurement, RepairResult, SearchSpec, repair, search_triggers
from gdm_ray.core.train import TrainConfig
from gdm_ray.core.triggers import TriggerSpec, make_trigger

TARGET = 1
SEED = 3
MESA_CFG = dict(steps=60, log_every=30, eval_samples=64, levels=2)
DEFENSE = DefenseConfig(epochs=1, batch_size=64)


@pytest.fixture(scope="module")
def backdoored():
    splits = load_splits(DataSpec(name="synthetic", samples=1200, num_classes=3, image_size=[12, 12], seed=3))
    trigger = make_trigger(TriggerSpec(family="bw3x3", number=341), 1, (12, 12))
    model = build_model("small_cnn", 1, 3, 8)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, channels_last=False)
    BadNets(trigger, TARGET, 0.2).fit(model, splits.train, splits.eval, cfg, torch.Generator().manual_seed(0))
    model.eval()
    return model, splits, trigger


def _repair(backdoored, spec: SearchSpec, seed: int = SEED, real: bool = True) -> RepairResult:
    model, splits, trigger = backdoored
    return repair(model, splits.defense, splits.eval, DEFENSE, torch.Generator().manual_seed(seed), seed + EVAL_SEED_OFFSET,
                  search=spec, real_trigger=trigger if real else None, real_target=TARGET if real else None)  # fmt: skip


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_repair_result_fields_and_the_original_is_untouched(backdoored):
    model = backdoored[0]
    original = _state(model)
    res = _repair(backdoored, SearchSpec("mesa", TARGET, MESAConfig(**MESA_CFG)))
    assert res.targets == [TARGET] and list(res.samplers) == [TARGET]
    assert isinstance(res.samplers[TARGET], MESA) and res.search is not None and res.search.sampler is res.samplers[TARGET]
    assert isinstance(res.before, Measurement) and isinstance(res.after, Measurement)
    for m in (res.before, res.after):
        assert 0.0 <= m.clean_accuracy <= 1.0 and m.asr is not None and 0.0 <= m.asr <= 1.0
        assert set(m.found_asr_by_class) == {TARGET} and m.found_asr == m.found_asr_by_class[TARGET]
    assert res.search_seconds > 0 and res.retrain_seconds > 0 and res.losses
    assert res.repaired is not None and res.repaired is not model
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # retraining changed the copy only
    assert any(not torch.equal(v, original[k]) for k, v in res.repaired.state_dict().items())
    d = res.before.as_dict()
    assert set(d) == {"clean_accuracy", "asr", "found_asr_by_class", "found_asr"} and list(d["found_asr_by_class"]) == [str(TARGET)]
    s = res.search.summary()
    assert s["method"] == "mesa" and s["target_class"] == TARGET and s["levels"] == 2


def test_same_seed_same_result_and_unknown_real_trigger(backdoored):
    spec = SearchSpec("baseline", TARGET, BaselineConfig(steps=40, restarts=1))
    a, b = _repair(backdoored, spec), _repair(backdoored, spec, real=False)
    assert a.before.as_dict()["found_asr"] == b.before.found_asr and a.after.clean_accuracy == b.after.clean_accuracy
    assert a.after.found_asr_by_class == b.after.found_asr_by_class and a.losses == b.losses
    assert isinstance(a.samplers[TARGET], PixelBaseline)
    assert b.before.asr is None and b.after.asr is None and b.before.as_dict()["asr"] is None
    assert a.search.summary()["method"] == "baseline"


def test_handed_in_samplers_and_nothing_to_repair(backdoored):
    model, splits, trigger = backdoored
    found = search_triggers("mesa", model, splits.defense, TARGET, MESAConfig(**MESA_CFG), torch.Generator().manual_seed(0),
                            preview_samples=5)  # fmt: skip
    assert len(found.previews) == 2 and found.previews[0][0].shape[0] == 5
    res = repair(model, splits.defense, splits.eval, DEFENSE, torch.Generator().manual_seed(0), 7,
                 samplers={TARGET: found.sampler}, search_seconds=1.5)  # fmt: skip
    assert res.search is None and res.search_seconds == 1.5 and res.targets == [TARGET] and res.after is not None
    none = repair(model, splits.defense, splits.eval, DEFENSE, torch.Generator().manual_seed(0), 7, samplers={})
    assert none.targets == [] and none.after is None and none.repaired is None and none.before.found_asr is None
    assert none.retrain_seconds == 0.0


def test_bad_requests_are_config_errors(backdoored):
    model, splits, _ = backdoored
    with pytest.raises(ConfigError, match="method='nope'"):
        SearchSpec("nope", TARGET, MESAConfig())
    with pytest.raises(ConfigError, match="BaselineConfig"):
        SearchSpec("baseline", TARGET, MESAConfig())
    with pytest.raises(ConfigError, match="exactly one"):
        repair(model, splits.defense, splits.eval, DEFENSE, torch.Generator(), 0)
