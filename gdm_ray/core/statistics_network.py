"""MINE: the mutual-information estimator MESA maximises (Belghazi, Baratin,
Rajeswar, Ozair, Bengio, Courville, Hjelm, "Mutual Information Neural
Estimation", ICML 2018).

A statistics network T(z, x) (an MLP on the concatenation [z, flatten(x)])
gives the Donsker-Varadhan lower bound

    I(X; Z) >= I_hat = E_joint[T(z, x)] - log E_marginal[exp T(z', x)],

where joint pairs are (z, G(z)) and marginal pairs take z' from the same
batch shuffled. Both T and the generator ascend I_hat. The plain mini-batch
gradient of the log-mean-exp term, E[grad T e^T] / E_batch[e^T], is biased;
MINE divides by a moving average of E_marginal[e^T] instead of the batch
mean (``ma_rate`` is its update rate, 0.01 in the paper). ``MINE`` keeps
that average per level, in log space so large T cannot overflow it.

For a deterministic generator x = G(z), h(G(Z)) = I(G(Z); Z) up to a constant,
so MESA uses I_hat as its entropy term (DESIGN.md section 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from gdm_ray.core.errors import ConfigError
from gdm_ray.core.generator import BatchedMLP, seeded_mlp

__all__ = ["StatisticsNetwork", "StaircaseStatistics", "MINE", "corrected_log_mean_exp", "donsker_varadhan"]


class _CorrectedLogMeanExp(torch.autograd.Function):
    """Value: log mean_b exp(t_b). Gradient: exp(t_b) / (B * moving average)
    instead of exp(t_b) / sum exp(t) (MINE's bias correction)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, log_ma: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(t, log_ma)
        return torch.logsumexp(t, dim=-1) - math.log(t.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        t, log_ma = ctx.saved_tensors
        return grad.unsqueeze(-1) * torch.exp(t - log_ma.unsqueeze(-1)) / t.shape[-1], None


def corrected_log_mean_exp(t: torch.Tensor, log_ma: torch.Tensor) -> torch.Tensor:
    """log mean exp over the last axis, with gradients divided by exp(log_ma)
    (a moving average of mean exp t) rather than by the batch's own mean."""
    return _CorrectedLogMeanExp.apply(t, log_ma.detach().to(t))


def donsker_varadhan(t_joint: torch.Tensor, t_marginal: torch.Tensor, log_ma: torch.Tensor | None = None) -> torch.Tensor:
    """I_hat = mean(T_joint) - log mean exp(T_marginal) over the last axis.

    With ``log_ma`` the second term's gradient uses MINE's moving-average
    denominator; without it the plain (biased) mini-batch gradient.
    """
    if log_ma is None:
        lme = torch.logsumexp(t_marginal, dim=-1) - math.log(t_marginal.shape[-1])
    else:
        lme = corrected_log_mean_exp(t_marginal, log_ma)
    return t_joint.mean(-1) - lme


def _check(noise_dim: int, x_dim: int, hidden: int, layers: int) -> None:
    for key, v in (("noise_dim", noise_dim), ("x_dim", x_dim), ("hidden", hidden), ("layers", layers)):
        if int(v) < 1:
            raise ConfigError(f"statistics network {key}={v} must be >= 1")


class StatisticsNetwork(nn.Module):
    """T(z, x): an MLP (ELU) on [z, flatten(x)] giving one score per pair.

    Shape:
        z: B x noise_dim, x: B x ... (x_dim values). Returns B.
    """

    def __init__(self, noise_dim: int, x_dim: int, hidden: int = 128, layers: int = 2, rng: torch.Generator | None = None) -> None:
        super().__init__()
        _check(noise_dim, x_dim, hidden, layers)
        self.noise_dim, self.x_dim = int(noise_dim), int(x_dim)
        self.net = seeded_mlp([self.noise_dim + self.x_dim] + [int(hidden)] * int(layers) + [1], nn.ELU, rng)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(*z.shape[:-1], -1)
        return self.net(torch.cat([z, x], dim=-1)).squeeze(-1)


class StaircaseStatistics(nn.Module):
    """One statistics network per MESA level, evaluated together (batched
    N x in x out weights, as ``StaircaseGenerators``).

    Shape:
        z: N x B x noise_dim, x: N x B x ... Returns N x B.
    """

    def __init__(
        self,
        levels: int,
        noise_dim: int,
        x_dim: int,
        hidden: int = 128,
        layers: int = 2,
        rng: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        _check(noise_dim, x_dim, hidden, layers)
        if int(levels) < 1:
            raise ConfigError(f"mesa.levels={levels} must be >= 1")
        self.levels, self.noise_dim, self.x_dim = int(levels), int(noise_dim), int(x_dim)
        sizes = [self.noise_dim + self.x_dim] + [int(hidden)] * int(layers) + [1]
        self.mlp = BatchedMLP(self.levels, sizes, rng, activation="elu")

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(*z.shape[:-1], -1)
        return self.mlp(torch.cat([z, x], dim=-1)).squeeze(-1)


class MINE(nn.Module):
    """The MINE estimator around a statistics network, with its moving average.

    ``forward(z, x)`` returns I_hat per leading index (a scalar for B x ...
    inputs to a ``StatisticsNetwork``; N values for N x B x ... inputs to a
    ``StaircaseStatistics``). Marginal samples pair x with z shuffled within
    its own batch (a separate permutation per level, drawn from
    ``rng``). Maximise the result to train T (and, through x, the
    generator).

    Example:
        >>> mine = MINE(StatisticsNetwork(2, 2))
        >>> mi = mine(z, x, rng=torch.Generator().manual_seed(0))
        >>> (-mi).backward()
    """

    def __init__(self, network: nn.Module, ma_rate: float = 0.01, levels: Sequence[int] = ()) -> None:
        super().__init__()
        if not 0.0 < float(ma_rate) <= 1.0:
            raise ConfigError(f"mesa.ma_rate={ma_rate} must be in (0, 1]")
        self.network = network
        self.ma_rate = float(ma_rate)
        # log of the moving average of E_marginal[exp T], per level; NaN = not started
        self.register_buffer("log_ma", torch.full(tuple(levels), float("nan")))

    def scores(self, z: torch.Tensor, x: torch.Tensor, rng: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """T on joint pairs and on marginal pairs (one network call for both)."""
        lead, b = z.shape[:-2], z.shape[-2]
        if b < 2:
            raise ConfigError(f"MINE needs at least 2 samples per batch to shuffle, got {b}")
        x = x.reshape(*z.shape[:-1], -1)
        keys = torch.rand(*lead, b, generator=rng).to(z.device)
        perm = keys.argsort(dim=-1).unsqueeze(-1).expand_as(z)
        z_marg = torch.gather(z, -2, perm)
        t = self.network(torch.cat([z, z_marg], dim=-2), torch.cat([x, x], dim=-2))
        return t[..., :b], t[..., b:]

    def forward(self, z: torch.Tensor, x: torch.Tensor, rng: torch.Generator | None = None, update: bool = True) -> torch.Tensor:
        t_joint, t_marg = self.scores(z, x, rng)
        lme = (torch.logsumexp(t_marg, dim=-1) - math.log(t_marg.shape[-1])).detach()
        if self.log_ma.shape != lme.shape:
            raise ValueError(f"MINE was built for {tuple(self.log_ma.shape)} levels, got scores for {tuple(lme.shape)}")
        if update:
            with torch.no_grad():
                fresh = torch.isnan(self.log_ma)
                if self.ma_rate < 1.0:
                    # log((1 - r) * ma + r * batch_mean), in log space
                    mixed = torch.logaddexp(self.log_ma + math.log1p(-self.ma_rate), lme + math.log(self.ma_rate))
                else:
                    mixed = lme
                self.log_ma.copy_(torch.where(fresh, lme, mixed))
        log_ma = torch.where(torch.isnan(self.log_ma), lme, self.log_ma)
        return donsker_varadhan(t_joint, t_marg, log_ma)
