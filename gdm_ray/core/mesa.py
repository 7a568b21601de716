"""MESA, the max-entropy staircase approximator (Qiao, Yang, Li, "Defending
Neural Backdoors via Generative Distribution Modeling", NeurIPS 2019), with
entropy estimated by MINE (Belghazi et al., "Mutual Information Neural
Estimation", ICML 2018).

The valid triggers of a backdoored classifier for target class c form a
distribution, modelled through ASR(x) cut into N levels (DESIGN.md section 1):
beta_i (i/N by default), X_i = {x : ASR(x) > beta_i}, and one generator G_i
per level trained to maximise the entropy of G_i(Z) while staying in X_i:

    L_i = -alpha * I_hat_i(G_i(z); z) + mean_b max(0, beta_i - F(G_i(z_b)))

F is the testing function, a differentiable stand-in for ASR: the backdoored
model's softmax probability of c on a clean non-target image with the
trigger applied at a random place ("softmax"), or the same constraint in log
space, max(0, log beta_i - log p_c), whose gradient does not vanish far from
the target ("ce", a cross-entropy hinge). I_hat_i is the MINE estimate of
its level's statistics network; for a deterministic G, h(G(Z)) = I(G(Z); Z),
so maximising I_hat maximises entropy.

All N levels train together: each step draws a batch per level, runs the N
generators and statistics networks batched, and makes one forward/backward
of the frozen classifier over the concatenated N x B triggered images.

Ensemble weights ("staircase" rule). The layer-cake identity gives
ASR(x) = integral_0^1 1[ASR(x) > t] dt ~ sum_i (beta_{i+1} - beta_i) 1[x in X_i]
with beta_N = 1. Each indicator is vol(X_i) times the uniform density on X_i;
the max-entropy G_i approximates that uniform density, and vol(X_i) =
exp(h(uniform on X_i)) ~ exp(H_i), H_i the level's final (smoothed) MINE
estimate. With few levels the lowest ones are crude: X_0 (beta_0 = 0) is
the whole trigger space, so G_0's samples are mostly not triggers, yet its
large entropy gives it the largest weight. Each level is therefore also
weighted by ASR_i, the measured ASR of its own samples (the mean of ASR(x)
under G_i: the self-normalised importance weight that moves a too-broad
component towards the target density p(x) ∝ ASR(x)):

    w_i ∝ (beta_{i+1} - beta_i) * exp(H_i) * ASR_i

Measured on a CIFAR-10 backdoor (3x3 colour), this moved level 0's weight
from 0.50 to 0.27 and the repaired model's ASR from 4.1% to 3.2%. The MINE
value is a lower bound and only its differences between levels matter, so
treat these weights as a rough approximation; ``ensemble="uniform"`` gives
every level 1/N.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.functional import log_softmax, relu

from gdm_ray.core.data import ImageSet
from gdm_ray.core.errors import ConfigError, DataError
from gdm_ray.core.extent import Extent, estimate_extent, extent_from_mask
from gdm_ray.core.first_pass import ScanConfig
from gdm_ray.core.generator import NOISES, StaircaseGenerators, sample_noise
from gdm_ray.core.statistics_network import MINE, StaircaseStatistics
from gdm_ray.core.train import frozen, model_device
from gdm_ray.core.triggers import apply_trigger, place

__all__ = ["MESAConfig", "MESA", "MESAResult", "TESTING_FUNCTIONS", "ENSEMBLE_RULES"]

TESTING_FUNCTIONS = ("softmax", "ce")
ENSEMBLE_RULES = ("staircase", "uniform")
_POOL_ON_DEVICE_BYTES = 256 * 2**20  # clean images smaller than this move to the device once


@dataclass
class MESAConfig:
    """MESA settings (the ``mesa`` config group). Paper defaults: N = 3 levels,
    beta_i = i/N, alpha = 0.1, noise dimension 10, 3x3 triggers, softmax
    testing function.

    levels: N. betas: ascending thresholds in [0, 1), one per level (None:
      i/N). alpha: entropy weight (>= 0). steps / batch_size (per level) / lr:
      Adam optimisation of generators and statistics networks together.
    noise: "normal" (Z ~ N(0, I)) or "uniform" (U(0, 1)^d).
    hidden / layers: generator MLP; stat_hidden / stat_layers: statistics network.
    trigger_size: [h, w]; None (the default) estimates the extent, and whether
      the trigger has a fixed place, from the target class's first-pass mask
      (gdm_ray.core.extent). with_mask: also learn a transparency mask
      (arbitrary shape); None: on when the extent is estimated, off when
      trigger_size is given. extent_steps: the estimate's search steps.
    collapse_entropy / restarts / restart_alpha: a level whose entropy
      estimate ends below collapse_entropy (nats) while its samples meet
      beta_i has collapsed onto one trigger (MESA degenerates into the
      one-trigger baseline); it is trained again from a fresh start, up to
      ``restarts`` times, with its entropy weight times restart_alpha.
    mask_l1: with a learned mask, the weight of its mean value (Neural Cleanse's
      mask norm) in each level's loss: the entropy term alone fills the whole
      box with half-transparent noise, which the repair then trains against.
    testing: "softmax" or "ce" (see the module docstring).
    images_per_trigger: clean images each trigger is tested on per step
      (F is their mean; 1 is cheapest).
    ma_rate: MINE moving-average rate. log_every: steps per history row.
    eval_samples: triggers per level for the final ASR of each level.
    ensemble: "staircase" or "uniform" weights.
    seed: seeds the torch.Generator when ``fit`` is given none.
    """

    levels: int = 3
    betas: list[float] | None = None
    alpha: float = 0.1
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    noise_dim: int = 10
    noise: str = "normal"
    hidden: int = 64
    layers: int = 2
    stat_hidden: int = 128
    stat_layers: int = 2
    trigger_size: list[int] | None = None  # None: estimated (gdm_ray.core.extent)
    position: list[int] | None = None  # fixed top-left [row, col]; None = random per image
    with_mask: bool | None = None  # None: on with an estimated extent
    testing: str = "softmax"
    images_per_trigger: int = 1
    ma_rate: float = 0.01
    log_every: int = 50
    eval_samples: int = 512
    ensemble: str = "staircase"
    extent_steps: int = 300  # the extent estimate's first-pass search steps (gdm_ray.core.extent)
    collapse_entropy: float = 0.05
    mask_l1: float = 0.0  # weight of the mean mask value (the trigger's footprint) in each level's loss; with_mask only
    restarts: int = 1
    restart_alpha: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.levels) < 1:
            raise ConfigError(f"mesa.levels={self.levels} must be >= 1")
        if self.betas is not None:
            b = [float(v) for v in self.betas]
            if len(b) != int(self.levels):
                raise ConfigError(f"mesa.betas={list(self.betas)} has {len(b)} values but mesa.levels={self.levels}")
            for v in b:
                if not 0.0 <= v < 1.0:
                    raise ConfigError(f"mesa.betas={list(self.betas)}: {v} is outside [0, 1)")
            if any(x >= y for x, y in zip(b, b[1:])):
                raise ConfigError(f"mesa.betas={list(self.betas)} must be strictly ascending")
            self.betas = b
        if not (math.isfinite(float(self.alpha)) and float(self.alpha) >= 0):
            raise ConfigError(f"mesa.alpha={self.alpha} must be a finite number >= 0")
        for key in (
            "steps",
            "noise_dim",
            "hidden",
            "layers",
            "stat_hidden",
            "stat_layers",
            "images_per_trigger",
            "log_every",
            "eval_samples",
            "extent_steps",
        ):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"mesa.{key}={getattr(self, key)} must be >= 1")
        if int(self.batch_size) < 2:
            raise ConfigError(f"mesa.batch_size={self.batch_size} must be >= 2 (MINE shuffles within a batch)")
        if not (math.isfinite(float(self.lr)) and float(self.lr) > 0):
            raise ConfigError(f"mesa.lr={self.lr} must be > 0")
        if not 0.0 < float(self.ma_rate) <= 1.0:
            raise ConfigError(f"mesa.ma_rate={self.ma_rate} must be in (0, 1]")
        if self.trigger_size is not None:
            ts = list(self.trigger_size)
            if len(ts) != 2 or min(int(s) for s in ts) < 1:
                raise ConfigError(f"mesa.trigger_size={ts} must be two positive integers [h, w]")
            self.trigger_size = [int(s) for s in ts]
        if self.position is not None and self.trigger_size is None:
            raise ConfigError(
                f"mesa.position={list(self.position)} needs mesa.trigger_size (a fixed place of an estimated extent is estimated too)"
            )
        if not (math.isfinite(float(self.collapse_entropy)) and float(self.collapse_entropy) >= 0):
            raise ConfigError(f"mesa.collapse_entropy={self.collapse_entropy} must be a finite number >= 0")
        if not (math.isfinite(float(self.mask_l1)) and float(self.mask_l1) >= 0):
            raise ConfigError(f"mesa.mask_l1={self.mask_l1} must be a finite number >= 0")
        if int(self.restarts) < 0:
            raise ConfigError(f"mesa.restarts={self.restarts} must be >= 0")
        if not (math.isfinite(float(self.restart_alpha)) and float(self.restart_alpha) > 0):
            raise ConfigError(f"mesa.restart_alpha={self.restart_alpha} must be > 0")
        if self.noise not in NOISES:
            raise ConfigError(f"mesa.noise={self.noise!r} must be one of {', '.join(NOISES)}")
        if self.testing not in TESTING_FUNCTIONS:
            raise ConfigError(f"mesa.testing={self.testing!r} must be one of {', '.join(TESTING_FUNCTIONS)}")
        if self.ensemble not in ENSEMBLE_RULES:
            raise ConfigError(f"mesa.ensemble={self.ensemble!r} must be one of {', '.join(ENSEMBLE_RULES)}")

    @property
    def beta_values(self) -> list[float]:
        """The thresholds beta_0..beta_{N-1} (i/N unless given)."""
        n = int(self.levels)
        return list(self.betas) if self.betas is not None else [i / n for i in range(n)]


@dataclass
class MESAResult:
    """What a MESA search found.

    generators: the trained staircase (on the model's device).
    weights: ensemble weight of each level (sums to 1).
    entropy: final smoothed MINE estimate per level (the entropy proxy H_i).
    asr: per level, the share of non-target images of ``data`` classified as
      the target with a fresh sample of that level's triggers applied.
    history: one row per level per logging interval, with the interval's
      means: step, level, beta, asr (of the training samples), score (mean
      F), hinge, mi, mask (mean mask value); a restart's rows also carry
      ``restart`` (its round).
    """

    target: int
    betas: list[float]
    alpha: float
    weights: list[float]
    entropy: list[float]
    asr: list[float]
    history: list[dict[str, float]]
    seconds: float
    steps: int
    generators: StaircaseGenerators
    config: dict = field(default_factory=dict)
    level_alpha: list[float] = field(default_factory=list)  # each level's entropy weight (raised where it restarted)
    restarted: list[int] = field(default_factory=list)  # per level: the last restart round (0: none)
    extent: dict | None = None  # the estimated extent (gdm_ray.core.extent.Extent), None when trigger_size was given


class _GradScale(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x unchanged on the way forward; its gradient times ``scale`` on the way back."""
    return _GradScale.apply(x, scale)


class MESA:
    """Model the valid triggers of ``target`` with a staircase of generators.

    Args:
        config: a ``MESAConfig`` (defaults: the paper's).

    Shape:
        ``fit`` takes a classifier of N x C x H x W images in [0, 1] and clean
        images of that shape; ``sample`` returns patterns n x C x h x w and
        masks n x h x w in [0, 1].

    Example:
        >>> mesa = MESA(MESAConfig(steps=500))
        >>> result = mesa.fit(model, splits.defense, target=3, rng=torch.Generator().manual_seed(0))
        >>> patterns, masks = mesa.sample(64, rng=torch.Generator().manual_seed(1))
    """

    def __init__(self, config: MESAConfig | None = None) -> None:
        self.config = config if config is not None else MESAConfig()
        self.generators: StaircaseGenerators | None = None
        self.weights: torch.Tensor | None = None

    # --- search ---------------------------------------------------------------

    def fit(
        self,
        model: nn.Module,
        data: ImageSet,
        target: int,
        rng: torch.Generator | None = None,
        progress: Callable[[int, int, float], None] | None = None,
        first_pass: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> MESAResult:
        """Train the N generators against the frozen ``model``.

        ``data`` holds clean images (the defender's set); only those whose
        label is not ``target`` are used. ``rng`` drives every random
        draw (the extent estimate, initialisation, noise, images, positions,
        shuffles); without one, ``config.seed`` seeds a fresh one.
        ``progress(step, total, loss)`` is called after every step. Without
        ``config.trigger_size`` the extent is estimated first, from
        ``first_pass`` (the class's first-pass pattern C x H x W and mask
        H x W, when a scan has one) or from a first-pass search of the class;
        ``self.config`` then holds the resolved size. The model's parameters,
        ``requires_grad`` flags and train/eval mode are left as they were.
        """
        cfg = self.config
        rng = rng if rng is not None else torch.Generator().manual_seed(int(cfg.seed))
        target = int(target)
        ch, H, W = data.shape
        if target < 0 or (data.num_classes > 0 and target >= data.num_classes):
            raise ConfigError(f"target_class={target} but the data has {data.num_classes} classes (0..{data.num_classes - 1})")
        pool = data.x[data.y != target]
        if len(pool) == 0:
            raise DataError(f"no clean images outside the target class {target} to test triggers on")
        extent = None
        if cfg.trigger_size is None:
            extent = self._estimate(model, data, target, rng, first_pass)
            with_mask = True if cfg.with_mask is None else bool(cfg.with_mask)
            cfg = dataclasses.replace(cfg, trigger_size=list(extent.size), position=extent.position, with_mask=with_mask)
        elif cfg.with_mask is None:
            cfg = dataclasses.replace(cfg, with_mask=False)
        h, w = cfg.trigger_size
        if h > H or w > W:
            raise ConfigError(f"mesa.trigger_size={cfg.trigger_size} is larger than the image {H}x{W}")
        if cfg.position is not None:
            r, c = (int(v) for v in (list(cfg.position) + [-1, -1])[:2])
            if len(cfg.position) != 2 or r < 0 or c < 0 or r + h > H or c + w > W:
                raise ConfigError(f"mesa.position={list(cfg.position)} does not fit a {h}x{w} trigger in the image {H}x{W}")
        self.config = cfg

        device = model_device(model)
        if pool.numel() * pool.element_size() <= _POOL_ON_DEVICE_BYTES:
            pool = pool.to(device)
        n_lv, steps = int(cfg.levels), int(cfg.steps)
        betas = cfg.beta_values
        alphas = [float(cfg.alpha)] * n_lv
        t0 = time.perf_counter()
        with frozen(model):
            gens, entropy, asr, history = self._train(model, pool, ch, target, list(range(n_lv)), alphas, rng, progress)
            restarted = [0] * n_lv
            for round_ in range(1, int(cfg.restarts) + 1):
                collapsed = [i for i in range(n_lv) if entropy[i] < float(cfg.collapse_entropy) and asr[i] >= betas[i]]
                if not collapsed:
                    break
                # a fresh start for the collapsed levels only, with a larger entropy weight
                tries = [alphas[i] * float(cfg.restart_alpha) for i in collapsed]
                report = None if progress is None else (lambda s, t, loss, r=round_: progress(r * steps + s, (r + 1) * steps, loss))
                g2, e2, a2, h2 = self._train(model, pool, ch, target, collapsed, tries, rng, report)
                history += [{**row, "restart": round_} for row in h2]
                for j, i in enumerate(collapsed):
                    restarted[i] = round_
                    if e2[j] > entropy[i] and a2[j] >= betas[i]:  # keep the restart only where it is better
                        gens.copy_level(i, g2, j)
                        entropy[i], asr[i], alphas[i] = e2[j], a2[j], tries[j]
        seconds = time.perf_counter() - t0

        weights = self._ensemble_weights(torch.tensor(entropy), asr)
        self.generators, self.weights = gens, weights
        return MESAResult(
            target=target,
            betas=betas,
            alpha=float(cfg.alpha),
            weights=[float(v) for v in weights],
            entropy=[float(v) for v in entropy],
            asr=asr,
            history=history,
            seconds=seconds,
            steps=steps,
            generators=gens,
            config=asdict(cfg),
            level_alpha=alphas,
            restarted=restarted,
            extent=None if extent is None else extent.as_dict(),
        )

    def _estimate(
        self, model: nn.Module, data: ImageSet, target: int, rng: torch.Generator, first_pass: tuple[torch.Tensor, torch.Tensor] | None
    ) -> Extent:
        """The trigger's extent (one seed drawn from ``rng``, whichever way it is found)."""
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=rng)))
        scan = ScanConfig(steps=int(self.config.extent_steps))
        if first_pass is not None:
            pattern, mask = first_pass
            return extent_from_mask(model, data, target, pattern, mask, rng=g, scan=scan)
        return estimate_extent(model, data, target, g, scan)

    def _train(
        self,
        model: nn.Module,
        pool: torch.Tensor,
        channels: int,
        target: int,
        levels: list[int],
        alphas: list[float],
        rng: torch.Generator,
        progress: Callable[[int, int, float], None] | None,
    ) -> tuple[StaircaseGenerators, list[float], list[float], list[dict[str, float]]]:
        """Train a staircase for the levels ``levels`` (indices into the
        betas) with entropy weights ``alphas``; returns the generators, each
        level's entropy estimate and ASR, and the history rows."""
        cfg = self.config
        device = model_device(model)
        n_lv, bs, k = len(levels), int(cfg.batch_size), int(cfg.images_per_trigger)
        beta_list = [cfg.beta_values[i] for i in levels]
        betas = torch.tensor(beta_list, dtype=torch.float32, device=device)
        # one entropy weight per level; a scalar while they agree, so the usual case stays as it was
        alpha = alphas[0] if len(set(alphas)) == 1 else torch.tensor(alphas, dtype=torch.float32, device=device).view(-1, 1, 1)
        gens = StaircaseGenerators(n_lv, channels, tuple(cfg.trigger_size), cfg.noise_dim, cfg.hidden, cfg.layers, bool(cfg.with_mask),
                                   cfg.noise, rng=rng).to(device)  # fmt: skip
        stats = StaircaseStatistics(n_lv, cfg.noise_dim, gens.out_dim, cfg.stat_hidden, cfg.stat_layers, rng=rng)
        mine = MINE(stats, cfg.ma_rate, levels=(n_lv,)).to(device)
        opt = torch.optim.Adam(list(gens.parameters()) + list(mine.parameters()), lr=float(cfg.lr))

        history: list[dict[str, float]] = []
        sums = torch.zeros(5, n_lv, device=device)  # asr, score, hinge, mi, mask over the interval
        mask_l1 = float(cfg.mask_l1) if cfg.with_mask else 0.0
        count = 0
        mi_ema, ema_rate = torch.zeros(n_lv, device=device), 0.02
        for step in range(1, int(cfg.steps) + 1):
            z = gens.sample_noise(bs, rng).to(device)  # N x B x d
            pattern, mask = gens(z)
            x_flat = _flat(pattern, mask, bool(cfg.with_mask))
            # One MINE call serves both players: the statistics network T ascends
            # I_hat at full strength, while the generators see dI_hat/dx scaled by
            # alpha (scale_grad), which is the gradient of their -alpha * I_hat term.
            mi = mine(z, scale_grad(x_flat, alpha), rng=rng)  # N
            logits = self._classify(model, pool, pattern, mask, k, rng)  # (N*B*k) x K
            score, hinge, asr = self._testing(logits, target, betas, n_lv, bs, k)
            footprint = mask.flatten(2).mean(2).mean(1)  # N: each level's mean mask value
            # L_i = -alpha_i * I_hat_i + hinge_i (+ mask_l1 * footprint_i) for G_i (alpha applied through scale_grad above)
            loss = (hinge - mi + mask_l1 * footprint).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

            with torch.no_grad():
                sums += torch.stack([asr, score, hinge, mi.detach(), footprint.detach()])
                mi_ema.mul_(1 - ema_rate).add_(mi.detach(), alpha=ema_rate)
            count += 1
            if step % int(cfg.log_every) == 0 or step == int(cfg.steps):
                means = (sums / count).cpu()
                for j, i in enumerate(levels):
                    history.append(
                        dict(
                            step=step,
                            level=i,
                            beta=beta_list[j],
                            asr=float(means[0, j]),
                            score=float(means[1, j]),
                            hinge=float(means[2, j]),
                            mi=float(means[3, j]),
                            mask=float(means[4, j]),
                        )
                    )
                sums.zero_()
                count = 0
            if progress is not None:
                progress(step, int(cfg.steps), float(loss.detach()))
        # bias-corrected EMA (as Adam's), so short runs are not pulled towards 0
        entropy = (mi_ema / (1 - (1 - ema_rate) ** int(cfg.steps))).cpu()
        gens.eval()
        asr_final = self._evaluate(model, gens, pool, target, rng)
        return gens, [float(v) for v in entropy], asr_final, history

    def _classify(
        self, model: nn.Module, pool: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor, k: int, rng: torch.Generator
    ) -> torch.Tensor:
        """Logits of the model on k random clean images per trigger, one forward for all levels."""
        n_lv, bs = pattern.shape[:2]
        m = n_lv * bs * k
        idx = torch.randint(0, len(pool), (m,), generator=rng).to(pool.device)
        images = pool[idx].to(pattern.device)
        pos = self.positions(m, tuple(images.shape[-2:]), rng)
        pat = pattern.reshape(n_lv * bs, *pattern.shape[2:]).repeat_interleave(k, dim=0)
        msk = mask.reshape(n_lv * bs, *mask.shape[2:]).repeat_interleave(k, dim=0)
        return model(apply_trigger(images, pat, msk, pos))

    @property
    def position(self) -> tuple[int, int] | None:
        """The fixed place of the triggers (None: random placement)."""
        p = self.config.position
        return None if p is None else (int(p[0]), int(p[1]))

    def positions(self, n: int, image_hw: tuple[int, int], rng: torch.Generator | None = None) -> torch.Tensor:
        """n top-left corners: the fixed position, or uniformly random ones."""
        return place(n, tuple(self.config.trigger_size), image_hw, self.position, rng)

    def _testing(
        self, logits: torch.Tensor, target: int, betas: torch.Tensor, n_lv: int, bs: int, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per level: mean F (target probability), mean hinge, and ASR of the batch."""
        if logits.dim() != 2 or logits.shape[1] <= target:
            raise ConfigError(f"target_class={target} but the model outputs {list(logits.shape)} logits")
        logp = log_softmax(logits.float(), dim=1)[:, target].view(n_lv, bs, k)
        log_f = torch.logsumexp(logp, dim=2) - math.log(k)  # log of F = mean p over the k images
        b = betas[:, None]
        if self.config.testing == "softmax":
            hinge = relu(b - log_f.exp())
        else:  # "ce": the same constraint F >= beta in log space; beta = 0 never binds
            hinge = torch.where(b > 0, relu(torch.log(b.clamp_min(1e-12)) - log_f), torch.zeros_like(log_f))
        with torch.no_grad():
            hits = (logits.argmax(1) == target).float().view(n_lv, bs * k).mean(1)
            score = log_f.exp().mean(1)
        return score.detach(), hinge.mean(1), hits

    @torch.no_grad()
    def _evaluate(self, model: nn.Module, gens: StaircaseGenerators, pool: torch.Tensor, target: int, rng: torch.Generator) -> list[float]:
        """ASR of each level's fresh samples on random clean non-target images."""
        n_lv, total = gens.levels, int(self.config.eval_samples)
        device = gens.mlp.layers[0].weight.device
        hits = torch.zeros(n_lv, device=device)
        chunk = max(1, 2048 // n_lv)
        for start in range(0, total, chunk):
            b = min(chunk, total - start)
            pattern, mask = gens(gens.sample_noise(b, rng).to(device))
            logits = self._classify(model, pool, pattern, mask, 1, rng)
            hits += (logits.argmax(1) == target).float().view(n_lv, b).sum(1)
        return [float(v) for v in (hits / total).cpu()]

    def _ensemble_weights(self, entropy: torch.Tensor, asr: list[float]) -> torch.Tensor:
        cfg = self.config
        n = int(cfg.levels)
        if cfg.ensemble == "uniform":
            return torch.full((n,), 1.0 / n)
        b = cfg.beta_values + [1.0]
        steps = torch.tensor([b[i + 1] - b[i] for i in range(n)], dtype=torch.float32)
        hit = torch.tensor(asr, dtype=torch.float32).clamp_min(1e-6)
        # w_i ∝ (beta_{i+1} - beta_i) exp(H_i) ASR_i, in log space; a MINE bound below 0 means ~0 entropy
        return torch.softmax(steps.log() + entropy.float().clamp_min(0.0) + hit.log(), dim=0)

    # --- sampling -------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, rng: torch.Generator | None = None, level: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n triggers from the ensemble (a level drawn per sample by the
        ensemble weights) or from one ``level``. Returns (patterns n x C x h x w,
        masks n x h x w) on the generators' device. Pass ``rng`` for
        reproducible draws (without one, torch's default generator is used).
        """
        if self.generators is None or self.weights is None:
            raise RuntimeError("MESA.sample needs a fitted staircase: call fit first")
        gens = self.generators
        n = int(n)
        if n < 0:
            raise ConfigError(f"sample n={n} must be >= 0")
        if level is not None and not 0 <= int(level) < gens.levels:
            raise ConfigError(f"level={level} must be in 0..{gens.levels - 1}")
        if level is None:
            levels = torch.multinomial(self.weights, n, replacement=True, generator=rng) if n else torch.zeros(0, dtype=torch.long)
        else:
            levels = torch.full((n,), int(level), dtype=torch.long)
        device = gens.mlp.layers[0].weight.device
        z = sample_noise((n, gens.noise_dim), gens.noise, rng)
        was_training = gens.training
        gens.eval()
        try:
            # every level on every z is cheap (tiny MLPs); pick each sample's level after
            pattern, mask = gens(z.to(device).unsqueeze(0).expand(gens.levels, -1, -1).contiguous())
        finally:
            gens.train(was_training)
        pick = torch.arange(n, device=device)
        levels = levels.to(device)
        return pattern[levels, pick].contiguous(), mask[levels, pick].contiguous()


def _flat(pattern: torch.Tensor, mask: torch.Tensor, with_mask: bool) -> torch.Tensor:
    """N x B x D vector of what the generator outputs (pattern, and the mask if learned)."""
    flat = pattern.flatten(2)
    return torch.cat([flat, mask.flatten(2)], dim=2) if with_mask else flat
