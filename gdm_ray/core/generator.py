"""Trigger generators of MESA: noise z -> a trigger (pattern, mask).

A generator G maps z ~ N(0, I) (or U(0, 1)^d) to a trigger pattern C x h x w
in [0, 1] (sigmoid output) and, for arbitrary-shape triggers, a mask
h x w in [0, 1] (DESIGN.md section 1). MESA trains one generator per
staircase level; ``StaircaseGenerators`` holds all N of them as one module.

Batching the N levels. ``StaircaseGenerators`` stores each layer's weights
as one N x in x out tensor and runs the N small MLPs with one ``baddbmm`` per
layer, instead of looping over a ``ModuleList`` of N ``TriggerGenerator``.
The loop pays Python and dispatch overhead per level, so the batched form
is several times faster and grows slowly with N (bench/generator_batching.py,
bench/results/generator_batching.md); it is the one MESA uses, and the
statistics networks (``StaircaseStatistics``) are batched the same way.
``level(i)`` and ``from_generators`` convert to and from single
``TriggerGenerator`` modules, plain ``nn.Linear`` stacks (easy to save,
inspect or serve).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from gdm_ray.core.errors import ConfigError

__all__ = ["NOISES", "TriggerGenerator", "StaircaseGenerators", "BatchedLinear", "BatchedMLP", "sample_noise"]

NOISES = ("normal", "uniform")


def sample_noise(shape: Sequence[int], noise: str = "normal", rng: torch.Generator | None = None) -> torch.Tensor:
    """Z ~ N(0, I) ("normal") or U(0, 1)^d ("uniform"), drawn on the CPU so a
    seed gives the same noise on any device."""
    if noise == "normal":
        return torch.randn(*shape, generator=rng)
    if noise == "uniform":
        return torch.rand(*shape, generator=rng)
    raise ConfigError(f"mesa.noise={noise!r} must be one of {', '.join(NOISES)}")


def _check_arch(channels: int, trigger_size: Sequence[int], noise_dim: int, hidden: int, layers: int, noise: str) -> None:
    if int(channels) < 1:
        raise ConfigError(f"generator channels={channels} must be >= 1")
    if len(trigger_size) != 2 or min(int(s) for s in trigger_size) < 1:
        raise ConfigError(f"mesa.trigger_size={list(trigger_size)} must be two positive integers [h, w]")
    if int(noise_dim) < 1:
        raise ConfigError(f"mesa.noise_dim={noise_dim} must be >= 1")
    if int(hidden) < 1:
        raise ConfigError(f"mesa.hidden={hidden} must be >= 1")
    if int(layers) < 1:
        raise ConfigError(f"mesa.layers={layers} must be >= 1")
    if noise not in NOISES:
        raise ConfigError(f"mesa.noise={noise!r} must be one of {', '.join(NOISES)}")


def _uniform_(t: torch.Tensor, bound: float, rng: torch.Generator | None) -> None:
    # nn.Linear's default init range (kaiming-uniform with a=sqrt(5) gives
    # 1/sqrt(fan_in)), but drawn from the caller's generator: no global RNG.
    with torch.no_grad():
        t.copy_(torch.rand(t.shape, generator=rng) * (2 * bound) - bound)


def seeded_mlp(sizes: list[int], activation: type[nn.Module], rng: torch.Generator | None) -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` between them,
    initialised from ``rng``."""
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b)
        _uniform_(lin.weight, 1 / math.sqrt(a), rng)
        _uniform_(lin.bias, 1 / math.sqrt(a), rng)
        mods.append(lin)
        if i < len(sizes) - 2:
            mods.append(activation())
    return nn.Sequential(*mods)


class TriggerGenerator(nn.Module):
    """One generator G: z (noise_dim) -> pattern C x h x w and mask h x w.

    A small MLP (``layers`` hidden layers of ``hidden`` units, ReLU) with a
    sigmoid output, so every pattern and mask value lies in [0, 1]. Without
    ``with_mask`` the mask is all ones (a square patch).

    Shape:
        z: B x noise_dim. Returns (pattern B x C x h x w, mask B x h x w).

    Example:
        >>> g = TriggerGenerator(1, (3, 3), rng=torch.Generator().manual_seed(0))
        >>> pattern, mask = g(g.sample_noise(16, torch.Generator().manual_seed(1)))
    """

    def __init__(
        self,
        channels: int,
        trigger_size: Sequence[int] = (3, 3),
        noise_dim: int = 10,
        hidden: int = 64,
        layers: int = 2,
        with_mask: bool = False,
        noise: str = "normal",
        rng: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        _check_arch(channels, trigger_size, noise_dim, hidden, layers, noise)
        self.channels = int(channels)
        self.trigger_size = (int(trigger_size[0]), int(trigger_size[1]))
        self.noise_dim = int(noise_dim)
        self.with_mask = bool(with_mask)
        self.noise = noise
        h, w = self.trigger_size
        self.out_dim = self.channels * h * w + (h * w if self.with_mask else 0)
        self.net = seeded_mlp([self.noise_dim] + [int(hidden)] * int(layers) + [self.out_dim], nn.ReLU, rng)

    def sample_noise(self, n: int, rng: torch.Generator | None = None) -> torch.Tensor:
        """n noise vectors (on the CPU; move them to the generator's device)."""
        return sample_noise((n, self.noise_dim), self.noise, rng)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _split_output(torch.sigmoid(self.net(z)), self.channels, self.trigger_size, self.with_mask)


def _split_output(out: torch.Tensor, channels: int, trigger_size: tuple[int, int], with_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., out_dim) in [0, 1] -> pattern (..., C, h, w), mask (..., h, w)."""
    h, w = trigger_size
    lead = out.shape[:-1]
    k = channels * h * w
    pattern = out[..., :k].reshape(*lead, channels, h, w)
    if with_mask:
        mask = out[..., k:].reshape(*lead, h, w)
    else:
        mask = out.new_ones(*lead, h, w)
    return pattern, mask


class BatchedLinear(nn.Module):
    """N independent linear layers applied at once: x (N, B, in) -> (N, B, out).

    ``weight`` is N x in x out (note: transposed w.r.t. ``nn.Linear``), so the
    forward is a single ``baddbmm``.
    """

    def __init__(self, n: int, in_features: int, out_features: int, rng: torch.Generator | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features))
        _uniform_(self.weight, 1 / math.sqrt(in_features), rng)
        _uniform_(self.bias, 1 / math.sqrt(in_features), rng)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class BatchedMLP(nn.Module):
    """N MLPs of the same shape evaluated together (ReLU between layers, or ELU)."""

    def __init__(self, n: int, sizes: Sequence[int], rng: torch.Generator | None = None, activation: str = "relu") -> None:
        super().__init__()
        self.n = int(n)
        self.layers = nn.ModuleList(BatchedLinear(n, a, b, rng) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = nn.ELU() if activation == "elu" else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x

    def copy_from_linears(self, index: int, linears: Sequence[nn.Linear]) -> None:
        """Load level ``index`` from a stack of ``nn.Linear`` layers."""
        with torch.no_grad():
            for layer, lin in zip(self.layers, linears, strict=True):
                layer.weight[index].copy_(lin.weight.t())
                layer.bias[index, 0].copy_(lin.bias)

    def copy_to_linears(self, index: int, linears: Sequence[nn.Linear]) -> None:
        """Write level ``index`` into a stack of ``nn.Linear`` layers."""
        with torch.no_grad():
            for layer, lin in zip(self.layers, linears, strict=True):
                lin.weight.copy_(layer.weight[index].t())
                lin.bias.copy_(layer.bias[index, 0])


class StaircaseGenerators(nn.Module):
    """The N generators G_0..G_{N-1} of a MESA staircase, evaluated together.

    Every level has the architecture of a ``TriggerGenerator``; the weights of
    all levels live in batched N x in x out tensors (see the module docstring
    for why: 2-4x faster than a loop over N modules on CPU).

    Shape:
        z: N x B x noise_dim (one batch per level).
        Returns (pattern N x B x C x h x w, mask N x B x h x w).
    """

    def __init__(
        self,
        levels: int,
        channels: int,
        trigger_size: Sequence[int] = (3, 3),
        noise_dim: int = 10,
        hidden: int = 64,
        layers: int = 2,
        with_mask: bool = False,
        noise: str = "normal",
        rng: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        _check_arch(channels, trigger_size, noise_dim, hidden, layers, noise)
        if int(levels) < 1:
            raise ConfigError(f"mesa.levels={levels} must be >= 1")
        self.levels = int(levels)
        self.channels = int(channels)
        self.trigger_size = (int(trigger_size[0]), int(trigger_size[1]))
        self.noise_dim = int(noise_dim)
        self.hidden = int(hidden)
        self.num_layers = int(layers)
        self.with_mask = bool(with_mask)
        self.noise = noise
        h, w = self.trigger_size
        self.out_dim = self.channels * h * w + (h * w if self.with_mask else 0)
        sizes = [self.noise_dim] + [self.hidden] * self.num_layers + [self.out_dim]
        self.mlp = BatchedMLP(self.levels, sizes, rng)

    def sample_noise(self, batch: int, rng: torch.Generator | None = None) -> torch.Tensor:
        """N x batch noise vectors (CPU)."""
        return sample_noise((self.levels, batch, self.noise_dim), self.noise, rng)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.dim() != 3 or z.shape[0] != self.levels or z.shape[2] != self.noise_dim:
            raise ValueError(f"expected z of shape {self.levels} x B x {self.noise_dim}, got {list(z.shape)}")
        return _split_output(torch.sigmoid(self.mlp(z)), self.channels, self.trigger_size, self.with_mask)

    def _arch(self) -> dict:
        return dict(
            channels=self.channels,
            trigger_size=self.trigger_size,
            noise_dim=self.noise_dim,
            hidden=self.hidden,
            layers=self.num_layers,
            with_mask=self.with_mask,
            noise=self.noise,
        )

    def copy_level(self, i: int, other: StaircaseGenerators, j: int) -> None:
        """Overwrite level ``i`` with level ``j`` of ``other`` (the same architecture)."""
        if other._arch() != self._arch():
            raise ConfigError("copy_level: the staircases have different architectures")
        with torch.no_grad():
            for mine, theirs in zip(self.mlp.layers, other.mlp.layers, strict=True):
                mine.weight[i].copy_(theirs.weight[j])
                mine.bias[i].copy_(theirs.bias[j])

    def level(self, i: int) -> TriggerGenerator:
        """A standalone copy of generator G_i (on the same device)."""
        if not 0 <= int(i) < self.levels:
            raise ConfigError(f"level={i} must be in 0..{self.levels - 1}")
        g = TriggerGenerator(**self._arch()).to(self.mlp.layers[0].weight.device)
        self.mlp.copy_to_linears(int(i), [m for m in g.net if isinstance(m, nn.Linear)])
        return g

    @classmethod
    def from_generators(cls, gens: Sequence[TriggerGenerator]) -> StaircaseGenerators:
        """Stack single generators of one architecture into a staircase."""
        if not gens:
            raise ConfigError("from_generators needs at least one generator")
        first = gens[0]
        linears0 = [m for m in first.net if isinstance(m, nn.Linear)]
        out = cls(
            len(gens),
            first.channels,
            first.trigger_size,
            first.noise_dim,
            linears0[0].out_features,
            len(linears0) - 1,
            first.with_mask,
            first.noise,
        )
        shape0 = [tuple(m.weight.shape) for m in linears0]
        for i, g in enumerate(gens):
            linears = [m for m in g.net if isinstance(m, nn.Linear)]
            same = (g.channels, g.trigger_size, g.with_mask, g.noise) == (first.channels, first.trigger_size, first.with_mask, first.noise)
            if not same or [tuple(m.weight.shape) for m in linears] != shape0:
                raise ConfigError(f"generator {i} has a different architecture from generator 0")
            out.mlp.copy_from_linears(i, linears)
        return out.to(linears0[0].weight.device)
