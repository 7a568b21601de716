"""Detection with an unknown target: which classes own anomalously easy triggers?

First pass (cheap, every class): a Neural-Cleanse-style search of one
trigger per class, a full-image pattern and transparency mask a
(``after = (1 - a) * before + a * pattern``) minimising
``CE(model(after), k) + lambda_k * |a|_1``. lambda_k adapts per class as in
Neural Cleanse: it grows while the trigger works (ASR >= ``asr_goal`` on the
batch), so the mask shrinks to the smallest region that still flips images to
k, and shrinks when it stops working. The smallest working mask seen is kept.
Many classes train together: one classifier forward/backward per step over
the concatenated batches of ``classes_per_pass`` classes, so hundreds of
classes cost ``steps * classes / classes_per_pass`` passes, not a MESA each.

Anomaly score: the median-absolute-deviation anomaly index of the log mask
size (L1 of a) over the classes,
``a_k = (median(log s) - log s_k) / (1.4826 * MAD(log s))``, positive when
class k's trigger is smaller than typical. Why log size: a backdoor's trigger
is small in absolute terms (a 3x3 patch is 9 pixels), and a clean class's
smallest "trigger" is an adversarial region tens to hundreds of pixels large;
sizes spread over orders of magnitude, and the log makes the MAD scale
meaningful across image sizes. A class whose search never reached
``valid_asr`` on held-out images counts with the whole image as its size
(no trigger). ASR enters through validity: only triggers that flip at least
``valid_asr`` of held-out images count as small. The model's score is the largest index; classes above
``threshold`` (2, Neural Cleanse's) are flagged, all of them, so natural and
injected backdoors are both reported.

``method="baseline"`` scores the same way but finds each class's trigger with
the project's pixel-space baseline (``PixelBaseline``: a full-image pattern
and an L1-penalised mask at a fixed lambda, one class at a time): plain
Neural Cleanse, the reference a scan is compared against (bench/detect.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.functional import cross_entropy

from gdm_ray.core.baseline import BaselineConfig, PixelBaseline
from gdm_ray.core.data import ImageSet
from gdm_ray.core.errors import ConfigError, DataError
from gdm_ray.core.train import frozen, model_device

__all__ = [
    "ScanConfig",
    "ClassTrigger",
    "ScanResult",
    "ScanPlan",
    "scan_classes",
    "plan_scan",
    "scan_chunks",
    "scan_result",
    "anomaly_index",
    "reference_anomaly",
    "rescore",
    "search_chunk",
    "split_images",
    "mask_asr",
    "MAD_FLOOR",
]


@dataclass
class ScanConfig:
    """First-pass settings (Neural Cleanse style, batched over classes)."""

    method: str = "batched"  # batched (adaptive lambda, classes together) | baseline (PixelBaseline per class)
    steps: int = 300  # per class
    batch_size: int = 32  # images per class per step
    lr: float = 0.1
    init_cost: float = 1e-3  # starting lambda (weight of the mask's L1)
    cost_step: float = 1.5  # lambda *= step while the trigger works, /= step**1.5 when not
    patience: int = 10  # steps between lambda updates
    asr_goal: float = 0.95  # a trigger "works" at this ASR (on the search batch)
    valid_asr: float = 0.8  # held-out ASR a found trigger needs to count as a trigger
    classes_per_pass: int = 16
    threshold: float = 2.0  # anomaly index above which a class is flagged
    eval_images: int = 1000  # held-out images for each found trigger's ASR
    moving_window: bool = False  # also map where each flagged class's trigger lives (fixed-location triggers)
    window: list[int] | None = None  # h x w; None = 15x15 on 55x47, scaled to the image
    stride: list[int] | None = None  # None = half the window

    def __post_init__(self) -> None:
        if self.method not in ("batched", "baseline"):
            raise ConfigError(f"scan.method={self.method!r} must be batched or baseline")
        for key in ("steps", "batch_size", "patience", "classes_per_pass", "eval_images"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"scan.{key}={getattr(self, key)} must be >= 1")
        for key in ("lr", "init_cost"):
            if not float(getattr(self, key)) > 0:
                raise ConfigError(f"scan.{key}={getattr(self, key)} must be > 0")
        if not float(self.cost_step) > 1:
            raise ConfigError(f"scan.cost_step={self.cost_step} must be > 1")
        for key in ("asr_goal", "valid_asr"):
            if not 0 < float(getattr(self, key)) <= 1:
                raise ConfigError(f"scan.{key}={getattr(self, key)} must be in (0, 1]")


@dataclass
class ClassTrigger:
    """The smallest working trigger found for one class."""

    target: int
    pattern: torch.Tensor  # C x H x W in [0, 1]
    mask: torch.Tensor  # H x W in [0, 1]
    size: float  # L1 of the mask (pixels); the whole image when nothing worked
    asr: float  # on held-out images
    valid: bool  # reached asr_goal on held-out images


@dataclass
class ScanResult:
    classes: list[ClassTrigger]
    anomaly: list[float]  # per class; higher = more suspicious
    flagged: list[int]  # classes above the threshold, most anomalous first
    score: float  # max anomaly index
    backdoored: bool
    seconds: float
    passes: int  # classifier forward/backward passes
    config: ScanConfig = field(default_factory=ScanConfig)


# Log-size MAD floor: repeated searches of one clean class vary its mask size
# by roughly 20%, so spreads below that are search noise, not signal.
MAD_FLOOR = 0.2


def anomaly_index(sizes: list[float]) -> list[float]:
    """MAD anomaly index of log sizes; positive = smaller than the median."""
    logs = torch.tensor([math.log(max(s, 1e-3)) for s in sizes], dtype=torch.float64)
    med = logs.median()
    mad = (logs - med).abs().median()
    # the floor keeps near-identical sizes (MAD ~ 0) from turning search noise into huge scores
    scale = 1.4826 * max(float(mad), MAD_FLOOR)
    return [float((med - v) / scale) for v in logs]


@dataclass
class ScanPlan:
    """How a first pass splits its work: which images search and which
    measure, the chunks of classes searched together, and a seed per chunk.
    A chunk's result depends only on the plan, so chunks can run in any
    order, in any process (gdm_ray.distributed runs them as Ray tasks)."""

    classes: list[int]
    chunks: list[list[int]]
    eval_idx: torch.Tensor
    search_idx: torch.Tensor
    seed: int  # chunk i searches with seed + i

    @property
    def passes(self) -> int:
        return len(self.chunks)


def plan_scan(
    data: ImageSet, cfg: ScanConfig | None = None, rng: torch.Generator | None = None, classes: list[int] | None = None
) -> ScanPlan:
    """Split the images and the classes of a first pass (see ``scan_classes``)."""
    cfg = cfg or ScanConfig()
    rng = rng if rng is not None else torch.Generator().manual_seed(0)
    num_classes = data.num_classes
    ks = list(range(num_classes)) if classes is None else [int(k) for k in classes]
    if not ks:
        raise ConfigError("scan: no classes to scan")
    bad = [k for k in ks if not 0 <= k < num_classes]
    if bad:
        raise ConfigError(f"scan: classes {bad} are not classes of the data (0..{num_classes - 1})")
    if len(data) < 2:
        raise DataError(f"scan: needs clean images, got {len(data)}")
    eval_idx, search_idx = split_images(data, cfg, rng)
    per = 1 if cfg.method == "baseline" else int(cfg.classes_per_pass)
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    return ScanPlan(ks, [ks[i : i + per] for i in range(0, len(ks), per)], eval_idx, search_idx, seed)


def split_images(data: ImageSet, cfg: ScanConfig, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded: the first ``eval_images`` (at most a fifth) measure, the rest search."""
    perm = torch.randperm(len(data), generator=rng)
    n_eval = min(int(cfg.eval_images), max(1, len(data) // 5))
    return perm[:n_eval], perm[n_eval:]


def scan_chunks(
    model: nn.Module,
    data: ImageSet,
    cfg: ScanConfig,
    plan: ScanPlan,
    which: list[int] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[ClassTrigger]:
    """Search the chunks ``which`` (indices into ``plan.chunks``; default all)
    and measure each found trigger on the plan's held-out images."""
    which = list(range(len(plan.chunks))) if which is None else list(which)
    device = model_device(model)
    x_tr, y_tr = data.x[plan.search_idx].to(device), data.y[plan.search_idx].to(device)
    x_ev, y_ev = data.x[plan.eval_idx].to(device), data.y[plan.eval_idx].to(device)
    search_set = ImageSet(x_tr, y_tr, data.classes)  # the baseline's search images, built once for every class
    total = len(which) * int(cfg.steps)
    found: list[ClassTrigger] = []
    done = 0
    with frozen(model):
        for i in which:
            chunk = plan.chunks[i]
            rng = torch.Generator().manual_seed(plan.seed + i)
            if cfg.method == "baseline":
                triggers = [_baseline_one(model, search_set, chunk[0], cfg, rng, progress, done, total)]
            else:
                triggers = search_chunk(model, x_tr, y_tr, chunk, None, cfg, rng, progress, done, total)
            for k, (pattern, mask) in zip(chunk, triggers):
                asr = mask_asr(model, x_ev, y_ev, k, pattern, mask)
                valid = asr >= float(cfg.valid_asr)
                size = float(mask.sum()) if valid else float(mask.numel())
                found.append(ClassTrigger(k, pattern.cpu(), mask.cpu(), size, asr, valid))
            done += int(cfg.steps)
    return found


def scan_result(plan: ScanPlan, cfg: ScanConfig, found: list[ClassTrigger], seconds: float) -> ScanResult:
    """The verdict from every class's found trigger (any order; sorted like the plan)."""
    order = {k: i for i, k in enumerate(plan.classes)}
    found = sorted(found, key=lambda c: order[c.target])
    if [c.target for c in found] != plan.classes:
        raise ValueError(f"scan_result: triggers for classes {[c.target for c in found]}, expected {plan.classes}")
    result = ScanResult(found, [], [], 0.0, False, seconds, plan.passes * int(cfg.steps), cfg)
    return rescore(result, anomaly_index([c.size for c in found]))


def scan_classes(
    model: nn.Module,
    data: ImageSet,
    cfg: ScanConfig | None = None,
    rng: torch.Generator | None = None,
    classes: list[int] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> ScanResult:
    """Search the smallest trigger of every class of ``model`` and score them.

    ``data``: the defender's clean images (all classes); the first
    ``eval_images`` of a seeded permutation measure each found trigger's ASR,
    the rest drive the search. ``classes`` defaults to all classes of the data.
    Up to ``classes_per_pass`` classes are searched together, one classifier
    pass per step for the whole chunk.
    """
    cfg = cfg or ScanConfig()
    t0 = time.perf_counter()
    plan = plan_scan(data, cfg, rng, classes)
    found = scan_chunks(model, data, cfg, plan, progress=progress)
    return scan_result(plan, cfg, found, time.perf_counter() - t0)


def rescore(result: ScanResult, anomaly: list[float]) -> ScanResult:
    """``result`` with new per-class anomaly indices, and the flags, score and
    verdict that follow from them (threshold from the result's config)."""
    found = result.classes
    if len(anomaly) != len(found):
        raise ValueError(f"rescore: {len(anomaly)} anomaly values for {len(found)} classes")
    order = sorted(range(len(found)), key=lambda i: -anomaly[i])
    flagged = [found[i].target for i in order if anomaly[i] > float(result.config.threshold) and found[i].valid]
    return dataclasses.replace(result, anomaly=list(anomaly), flagged=flagged, score=max(anomaly), backdoored=bool(flagged))


def reference_anomaly(sizes: list[list[float]]) -> list[list[float]]:
    """Anomaly indices of many models' class trigger sizes against each other
    (a zoo of models for the same classes).

    A class can own a natural trigger: in every Fashion-MNIST CNN the Bag
    class has a small one, so a within-model index flags clean models. Across
    a zoo, what is anomalous is a class whose trigger is smaller *than that
    class's usually is*. On log sizes z[m][k]: remove each model's median
    (architectures differ in overall robustness), then each class's median
    residual over the models (the class's natural size), and scale what is
    left by its pooled MAD (floored like ``anomaly_index``). Medians keep
    this robust while fewer than half the models share a backdoored class.
    """
    if len(sizes) < 3:
        raise ValueError(f"reference_anomaly needs at least 3 models, got {len(sizes)}")
    if len({len(s) for s in sizes}) != 1:
        raise ValueError("reference_anomaly: every model needs the same classes")
    z = torch.tensor([[math.log(max(v, 1e-3)) for v in s] for s in sizes], dtype=torch.float64)
    z = z - z.median(dim=1, keepdim=True).values
    d = z - z.median(dim=0, keepdim=True).values
    mad = (d - d.median()).abs().median()
    scale = 1.4826 * max(float(mad), MAD_FLOOR)
    return (-d / scale).tolist()


def search_chunk(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    chunk: list[int],
    regions: torch.Tensor | None,
    cfg: ScanConfig,
    rng: torch.Generator,
    progress: Callable[[int, int, float], None] | None,
    done: int,
    total: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Neural Cleanse for the slots of one chunk, one classifier pass per step.

    Slot i searches a trigger for class ``chunk[i]``; with ``regions``
    (m x H x W in {0, 1}) its mask is confined to region i (a window).
    """
    device = x.device
    m, bs = len(chunk), int(cfg.batch_size)
    _, c, H, W = x.shape
    target = torch.tensor(chunk, device=device)
    p_logit = (torch.randn(m, c, H, W, generator=rng) * 0.5).to(device).requires_grad_(True)
    m_logit = (torch.randn(m, H, W, generator=rng) * 0.5 - 2.0).to(device).requires_grad_(True)
    opt = torch.optim.Adam([p_logit, m_logit], lr=float(cfg.lr), betas=(0.5, 0.9))
    lam = torch.full((m,), float(cfg.init_cost), device=device)
    best_size = torch.full((m,), math.inf, device=device)
    best_p, best_m = torch.sigmoid(p_logit).detach().clone(), torch.sigmoid(m_logit).detach().clone()
    hits_window = torch.zeros(m, device=device)
    for step in range(1, int(cfg.steps) + 1):
        idx = torch.randint(0, len(x), (m, bs), generator=rng).to(device)
        imgs, labels = x[idx], y[idx]  # m x B x C x H x W, m x B
        use = (labels != target[:, None]).float()
        mask = torch.sigmoid(m_logit)
        if regions is not None:
            mask = mask * regions
        mask = mask[:, None, None]  # m x 1 x 1 x H x W
        after = (1 - mask) * imgs + mask * torch.sigmoid(p_logit)[:, None]
        logits = model(after.flatten(0, 1))
        ce = cross_entropy(logits, target.repeat_interleave(bs), reduction="none").view(m, bs)
        ce = (ce * use).sum(1) / use.sum(1).clamp_min(1)
        size = mask.flatten(1).sum(1)
        loss = (ce + lam * size).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            hits = ((logits.argmax(1).view(m, bs) == target[:, None]).float() * use).sum(1) / use.sum(1).clamp_min(1)
            hits_window += hits
            better = (hits >= float(cfg.asr_goal)) & (size < best_size)
            if bool(better.any()):
                best_size = torch.where(better, size, best_size)
                best_p[better] = torch.sigmoid(p_logit)[better]
                best_m[better] = mask[better, 0, 0]
            if step % int(cfg.patience) == 0:
                works = hits_window / int(cfg.patience) >= float(cfg.asr_goal)
                lam = torch.where(works, lam * float(cfg.cost_step), lam / float(cfg.cost_step) ** 1.5)
                hits_window.zero_()
        if progress is not None:
            progress(done + step, total, float(loss.detach()))
    never = torch.isinf(best_size)  # nothing ever worked: report where the search ended
    best_p[never] = torch.sigmoid(p_logit).detach()[never]
    best_m[never] = torch.sigmoid(m_logit).detach()[never]
    if regions is not None:
        best_m = best_m * regions
    return [(best_p[i], best_m[i]) for i in range(m)]


def _baseline_one(
    model: nn.Module,
    data: ImageSet,
    k: int,
    cfg: ScanConfig,
    rng: torch.Generator,
    progress: Callable[[int, int, float], None] | None,
    done: int,
    total: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain Neural Cleanse for one class: PixelBaseline over the whole image,
    mask L1 at the fixed lambda ``init_cost``, the scan's steps/batch/lr."""
    _, H, W = data.shape
    bcfg = BaselineConfig(
        trigger_size=[H, W],
        with_mask=True,
        mask_l1=float(cfg.init_cost),
        steps=int(cfg.steps),
        batch_size=int(cfg.batch_size),
        lr=float(cfg.lr),
        restarts=1,
    )
    tick = None if progress is None else (lambda step, _total, loss: progress(done + step, total, loss))
    res = PixelBaseline(bcfg).fit(model, data, k, rng, tick)
    device = model_device(model)
    return res.pattern.to(device), res.mask.to(device)


@torch.no_grad()
def mask_asr(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, pattern: torch.Tensor, mask: torch.Tensor) -> float:
    keep = y != k
    if not bool(keep.any()):
        return 0.0
    hits = 0
    xs = x[keep]
    for i in range(0, len(xs), 512):
        b = xs[i : i + 512]
        hits += int((model((1 - mask) * b + mask * pattern).argmax(1) == k).sum())
    return hits / len(xs)
