"""MESA: generators, the MINE estimator, and the staircase search on a small
backdoored model (synthetic 16x16 data, a 3x3 black-white trigger)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gdm_ray.core.attack import BadNets
from gdm_ray.core.data import ImageSet, Splits
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.generator import StaircaseGenerators, TriggerGenerator
from gdm_ray.core.mesa import MESA, MESAConfig
from gdm_ray.core.metrics import predict
from gdm_ray.core.models import build_model
from gdm_ray.core.statistics_network import MINE, StaircaseStatistics, corrected_log_mean_exp
from gdm_ray.core.train import TrainConfig
from gdm_ray.core.triggers import TriggerSpec, apply_trigger, make_trigger, random_positions

TARGET = 1
STEPS = 300


@pytest.fixture(scope="module")
def backdoored(synthetic_splits: Splits) -> nn.Module:
    with torch.random.fork_rng():  # weight init uses the global RNG; keep it local to this fixture
        torch.manual_seed(0)
        model = build_model("small_cnn", 1, 4, 8)
    trigger = make_trigger(TriggerSpec(family="bw3x3", number=341), 1, (16, 16))
    cfg = TrainConfig(epochs=4, batch_size=64, lr=0.05, channels_last=False)
    result = BadNets(trigger, TARGET, rate=0.2).fit(
        model, synthetic_splits.train, synthetic_splits.eval, cfg, torch.Generator().manual_seed(0)
    )
    assert result.asr > 0.9 and result.clean_accuracy > 0.8, "precondition: the backdoor is implanted"
    return model


@pytest.fixture(scope="module")
def fits(backdoored: nn.Module, synthetic_splits: Splits) -> dict[float, tuple[MESA, object]]:
    """The default staircase (3 levels, betas 0, 1/3, 2/3) searched with a large and a tiny alpha."""
    out = {}
    for alpha in (1.0, 0.001):
        mesa = MESA(MESAConfig(trigger_size=[3, 3], restarts=0, alpha=alpha, steps=STEPS, log_every=50))
        out[alpha] = (mesa, mesa.fit(backdoored, synthetic_splits.defense, TARGET, torch.Generator().manual_seed(0)))
    return out


def _asr(model: nn.Module, data: ImageSet, patterns: torch.Tensor, alphas: torch.Tensor, seed: int = 5) -> float:
    """Share of non-target images classified as TARGET, one sampled trigger per image."""
    g = torch.Generator().manual_seed(seed)
    x = data.x[data.y != TARGET]
    idx = torch.randint(0, len(x), (len(patterns),), generator=g)
    pos = random_positions(len(patterns), tuple(patterns.shape[-2:]), tuple(x.shape[-2:]), g)
    return float((predict(model, apply_trigger(x[idx], patterns, alphas, pos)) == TARGET).float().mean())


def _diversity(patterns: torch.Tensor) -> float:
    return float(torch.pdist(patterns.flatten(1)).mean())


# --- the search ------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 0.001])
def test_each_level_reaches_its_beta(fits, backdoored, synthetic_splits, alpha):
    mesa, result = fits[alpha]
    assert result.betas == pytest.approx([0.0, 1 / 3, 2 / 3])
    for level, beta in enumerate(result.betas):
        patterns, alphas = mesa.sample(400, rng=torch.Generator().manual_seed(3), level=level)
        assert patterns.shape == (400, 1, 3, 3) and alphas.shape == (400, 3, 3)
        assert float(patterns.min()) >= 0 and float(patterns.max()) <= 1
        assert torch.equal(alphas, torch.ones_like(alphas))  # with_mask=False: square patches
        # measured on the held-out eval split, not the defense split the search used
        held_out = _asr(backdoored, synthetic_splits.eval, patterns, alphas)
        assert held_out > beta - 0.05, (level, beta, held_out)
        assert result.asr[level] > beta - 0.05, (level, beta, result.asr)
    top = len(result.betas) - 1
    patterns, alphas = mesa.sample(400, rng=torch.Generator().manual_seed(4), level=top)
    assert _asr(backdoored, synthetic_splits.eval, patterns, alphas) > 0.5
    assert result.asr[top] > 0.5


def test_larger_alpha_gives_more_entropy_and_diversity(fits):
    (big, r_big), (small, r_small) = fits[1.0], fits[0.001]
    # level 0 (beta 0) has no constraint, so both alphas just maximise entropy there
    for level in (1, 2):
        assert r_big.entropy[level] > r_small.entropy[level] + 0.3, (r_big.entropy, r_small.entropy)
        d_big = _diversity(big.sample(300, rng=torch.Generator().manual_seed(1), level=level)[0])
        d_small = _diversity(small.sample(300, rng=torch.Generator().manual_seed(1), level=level)[0])
        assert d_big > 2 * d_small, (level, d_big, d_small)
    # a higher beta leaves less room: the entropy falls along the staircase
    assert r_big.entropy[0] > r_big.entropy[2]


def test_history_and_ensemble_weights(fits):
    mesa, result = fits[1.0]
    assert [row["step"] for row in result.history if row["level"] == 0] == [50, 100, 150, 200, 250, 300]
    assert {row["level"] for row in result.history} == {0, 1, 2}
    for row in result.history:
        assert set(row) == {"step", "level", "beta", "asr", "score", "hinge", "mi", "mask"}
        assert all(math.isfinite(v) for v in row.values())
    last = [row for row in result.history if row["step"] == STEPS]
    assert last[2]["asr"] > last[2]["beta"] and last[2]["hinge"] < 0.2
    assert last[0]["hinge"] == 0.0  # beta_0 = 0 never binds
    # staircase rule: w_i ∝ (beta_{i+1} - beta_i) * exp(H_i) * ASR_i, beta_N = 1
    raw = [(1 / 3) * math.exp(max(h, 0.0)) * max(a, 1e-6) for h, a in zip(result.entropy, result.asr)]
    assert result.weights == pytest.approx([r / sum(raw) for r in raw], rel=1e-5)
    assert mesa.weights is not None and float(mesa.weights.sum()) == pytest.approx(1.0)


def test_ensemble_sample_draws_a_level_per_sample(fits):
    mesa, _ = fits[1.0]
    saved = mesa.weights.clone()
    try:
        mesa.weights = torch.tensor([0.0, 0.0, 1.0])
        patterns, alphas = mesa.sample(64, rng=torch.Generator().manual_seed(9))
        # sampling draws the levels first, then the noise, from the same generator
        g = torch.Generator().manual_seed(9)
        torch.multinomial(mesa.weights, 64, replacement=True, generator=g)
        z = torch.randn(64, mesa.generators.noise_dim, generator=g)
        expected, _ = mesa.generators.level(2)(z)
        assert torch.allclose(patterns, expected, atol=1e-6)
        assert not torch.allclose(patterns, mesa.generators.level(0)(z)[0], atol=1e-3)
    finally:
        mesa.weights = saved
    assert mesa.sample(0, rng=torch.Generator().manual_seed(0))[0].shape == (0, 1, 3, 3)
    with pytest.raises(ConfigError, match="level=3"):
        mesa.sample(4, rng=torch.Generator().manual_seed(0), level=3)
    with pytest.raises(RuntimeError, match="fit"):
        MESA().sample(4)


def test_same_seed_same_samples(backdoored, synthetic_splits):
    def run(seed: int) -> tuple[torch.Tensor, list]:
        mesa = MESA(MESAConfig(trigger_size=[3, 3], restarts=0, steps=20, log_every=10))
        result = mesa.fit(backdoored, synthetic_splits.defense, TARGET, torch.Generator().manual_seed(seed))
        return mesa.sample(50, rng=torch.Generator().manual_seed(7))[0], result.history

    (a, ha), (b, hb), (c, _) = run(11), run(11), run(12)
    assert torch.equal(a, b)
    assert ha == hb
    assert not torch.allclose(a, c)


def test_model_is_frozen_and_restored(backdoored, synthetic_splits):
    model = copy.deepcopy(backdoored)
    model.train()
    model.head[-1].weight.requires_grad_(False)  # a mixed set of flags must come back as it was
    model.features[0].eval()  # and so must a submodule's own mode
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    before = copy.deepcopy(model.state_dict())
    seen: list[tuple[bool, bool]] = []

    def progress(step: int, total: int, loss: float) -> None:
        seen.append((model.training, any(p.requires_grad for p in model.parameters())))
        assert total == 5 and math.isfinite(loss)

    MESA(MESAConfig(trigger_size=[3, 3], restarts=0, steps=5)).fit(
        model, synthetic_splits.defense, TARGET, torch.Generator().manual_seed(0), progress
    )
    assert seen == [(False, False)] * 5  # eval mode and frozen during the search
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm statistics included


def test_ce_testing_function_with_mask_mask(backdoored, synthetic_splits):
    cfg = MESAConfig(trigger_size=[3, 3], restarts=0, levels=2, betas=[0.0, 0.5], steps=150, testing="ce", with_mask=True, noise="uniform")
    mesa = MESA(cfg)
    result = mesa.fit(backdoored, synthetic_splits.defense, TARGET, torch.Generator().manual_seed(0))
    assert result.betas == [0.0, 0.5]
    patterns, alphas = mesa.sample(200, rng=torch.Generator().manual_seed(1), level=1)
    assert alphas.shape == (200, 3, 3) and float(alphas.min()) >= 0 and float(alphas.max()) <= 1
    assert not torch.equal(alphas, torch.ones_like(alphas))  # the mask is learned
    assert _asr(backdoored, synthetic_splits.eval, patterns, alphas) > 0.5


# --- configuration errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": -0.1}, "mesa.alpha=-0.1"),
        ({"alpha": float("nan")}, "mesa.alpha=nan"),
        ({"betas": [0.0, 0.5, 1.0]}, r"mesa.betas=\[0.0, 0.5, 1.0\]: 1.0 is outside"),
        ({"betas": [-0.1, 0.5, 0.7]}, "outside"),
        ({"betas": [0.0, 0.5]}, "mesa.levels=3"),
        ({"betas": [0.0, 0.6, 0.5]}, "ascending"),
        ({"steps": 0}, "mesa.steps=0"),
        ({"batch_size": 1}, "mesa.batch_size=1"),
        ({"levels": 0}, "mesa.levels=0"),
        ({"lr": 0}, "mesa.lr=0"),
        ({"testing": "mse"}, "mesa.testing='mse'"),
        ({"noise": "laplace"}, "mesa.noise='laplace'"),
        ({"trigger_size": [3]}, r"mesa.trigger_size=\[3\]"),
        ({"ensemble": "max"}, "mesa.ensemble='max'"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MESAConfig(**kwargs)


def test_fit_errors(backdoored, synthetic_splits):
    model = copy.deepcopy(backdoored)
    with pytest.raises(ConfigError, match=r"mesa.trigger_size=\[20, 3\] is larger than the image 16x16"):
        MESA(MESAConfig(trigger_size=[20, 3], steps=1)).fit(model, synthetic_splits.defense, TARGET, torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="target_class=4"):
        MESA(MESAConfig(trigger_size=[3, 3], restarts=0, steps=1)).fit(model, synthetic_splits.defense, 4, torch.Generator().manual_seed(0))
    assert model.training and all(p.requires_grad for p in model.parameters())


# --- generators ----------------------------------------------------------------------


@pytest.mark.parametrize("with_mask", [False, True])
def test_staircase_generators_match_single_generators(with_mask):
    g = torch.Generator().manual_seed(0)
    stair = StaircaseGenerators(4, 3, (2, 5), noise_dim=6, hidden=16, with_mask=with_mask, rng=g)
    z = stair.sample_noise(8, g)
    assert z.shape == (4, 8, 6)
    with torch.no_grad():
        pattern, alpha = stair(z)
    assert pattern.shape == (4, 8, 3, 2, 5) and alpha.shape == (4, 8, 2, 5)
    assert float(pattern.min()) >= 0 and float(pattern.max()) <= 1
    assert float(alpha.min()) >= 0 and float(alpha.max()) <= 1
    assert torch.equal(alpha, torch.ones_like(alpha)) != with_mask
    singles = [stair.level(i) for i in range(4)]
    for i, single in enumerate(singles):
        p_i, a_i = single(z[i])
        assert torch.allclose(p_i, pattern[i], atol=1e-6) and torch.allclose(a_i, alpha[i], atol=1e-6)
    # the levels are distinct networks, and stacking singles back gives the same staircase
    assert not torch.allclose(singles[0](z[0])[0], singles[1](z[0])[0])
    restacked = StaircaseGenerators.from_generators(singles)
    assert torch.allclose(restacked(z)[0], pattern, atol=1e-6)
    with pytest.raises(ConfigError, match="different architecture"):
        StaircaseGenerators.from_generators([singles[0], TriggerGenerator(1, (2, 5), noise_dim=6, hidden=16, with_mask=with_mask)])


def test_generator_noise_and_seeding():
    a = TriggerGenerator(1, noise="uniform", rng=torch.Generator().manual_seed(0))
    b = TriggerGenerator(1, noise="uniform", rng=torch.Generator().manual_seed(0))
    z = a.sample_noise(500, torch.Generator().manual_seed(1))
    assert float(z.min()) >= 0 and float(z.max()) <= 1 and z.shape == (500, 10)
    assert torch.equal(a(z)[0], b(z)[0])
    zn = TriggerGenerator(1).sample_noise(2000, torch.Generator().manual_seed(1))
    assert float(zn.min()) < -1 and abs(float(zn.mean())) < 0.05 and abs(float(zn.std()) - 1) < 0.05
    with pytest.raises(ConfigError, match="mesa.noise='cauchy'"):
        TriggerGenerator(1, noise="cauchy")


# --- MINE ------------------------------------------------------------------------------


def test_mine_separates_dependent_from_independent():
    """Level 0: x = z + 0.5 * noise in 2-D (true MI = ln 5 = 1.61 nats); level 1: x independent of z."""
    g = torch.Generator().manual_seed(0)
    mine = MINE(StaircaseStatistics(2, 2, 2, hidden=64, rng=g), ma_rate=0.01, levels=(2,))
    opt = torch.optim.Adam(mine.parameters(), lr=3e-3)

    def batch(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(2, b, 2, generator=g)
        return z, torch.stack([z[0] + 0.5 * torch.randn(b, 2, generator=g), torch.randn(b, 2, generator=g)])

    for _ in range(400):
        mi = mine(*batch(256), rng=g)
        opt.zero_grad()
        (-mi.sum()).backward()
        opt.step()
    with torch.no_grad():
        est = mine(*batch(4096), rng=g, update=False)
    assert 1.1 < float(est[0]) < 1.8, est  # a lower bound, close to ln 5
    assert abs(float(est[1])) < 0.1, est


class _FirstFeature(nn.Module):
    """T(z, x) = x[..., 0]: ignores z, so marginal scores are known whatever the shuffle."""

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x[..., 0]


def test_mine_moving_average_gradient_correction():
    t = torch.tensor([[0.0, 1.0, 2.0, 3.0]], requires_grad=True)
    log_ma = torch.tensor([1.5])
    value = corrected_log_mean_exp(t, log_ma)
    assert float(value.detach()) == pytest.approx(math.log(sum(math.exp(v) for v in range(4)) / 4))
    value.sum().backward()
    # d/dt of log mean exp with the batch mean replaced by the moving average
    assert torch.allclose(t.grad, torch.exp(t.detach()) / (4 * math.exp(1.5)))

    mine = MINE(_FirstFeature(), ma_rate=0.1)
    z = torch.zeros(4, 1)
    x1 = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    x2 = torch.tensor([[1.0], [1.0], [1.0], [1.0]], requires_grad=True)
    mine(z, x1)
    m1 = float(torch.exp(x1).mean())
    assert float(mine.log_ma) == pytest.approx(math.log(m1))  # starts at the first batch's mean
    mi = mine(z, x2)
    ma = 0.9 * m1 + 0.1 * math.e
    assert float(mine.log_ma) == pytest.approx(math.log(ma))
    assert float(mi.detach()) == pytest.approx(1.0 - 1.0)  # mean T - log mean exp T, both 1
    mi.backward()
    # joint term: 1/4 each; marginal term: -e / (4 * moving average) instead of -1/4
    assert torch.allclose(x2.grad[:, 0], torch.full((4,), 0.25 - math.e / (4 * ma)))
    with torch.no_grad():
        mine(z, x1, update=False)
    assert float(mine.log_ma) == pytest.approx(math.log(ma))
