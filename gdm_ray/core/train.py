"""The one supervised training loop that attacks (and later defenses) share.

A ``batch_hook`` transforms each (augmented) batch before the step: the
attack poisons images there, the defense applies sampled triggers there.
Augmentation happens before the hook, so triggers are never cropped or
flipped away.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.functional import kl_div, log_softmax

from gdm_ray.core.data import ImageSet
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.program import ProgramBatchNorm

__all__ = ["TrainConfig", "train_classifier", "augment", "model_device", "frozen"]

# (x, y, rng) -> (x, y), or (x, y, source) when the hook adds rows: source[i] is the input row output row i came from
BatchHook = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, ...]]


@dataclass
class TrainConfig:
    """Optimisation settings. The defaults suit the small CNN on Fashion-MNIST."""

    epochs: float = 5
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # onecycle | cosine | constant
    label_smoothing: float = 0.0
    crop_pad: int = 0  # random-crop padding (0 = off)
    flip: bool = False  # random horizontal flips
    channels_last: bool = True  # faster convolutions on CPU
    batchnorm: str = "train"  # train (update running statistics) | frozen (keep them, as the model came)
    distill: float = 0.0  # weight of the distillation term (needs a teacher; see train_classifier)
    temperature: float = 2.0  # distillation temperature

    def __post_init__(self) -> None:
        if float(self.epochs) <= 0:
            raise ConfigError(f"train.epochs={self.epochs} must be > 0")
        if int(self.batch_size) < 1:
            raise ConfigError(f"train.batch_size={self.batch_size} must be >= 1")
        if float(self.lr) <= 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"train.optimizer={self.optimizer!r} must be 'sgd' or 'adam'")
        if self.schedule not in ("onecycle", "cosine", "constant"):
            raise ConfigError(f"train.schedule={self.schedule!r} must be onecycle, cosine or constant")
        if int(self.crop_pad) < 0:
            raise ConfigError(f"train.crop_pad={self.crop_pad} must be >= 0")
        if self.batchnorm not in ("train", "frozen"):
            raise ConfigError(f"train.batchnorm={self.batchnorm!r} must be 'train' or 'frozen'")
        if not float(self.distill) >= 0:
            raise ConfigError(f"train.distill={self.distill} must be >= 0")
        if not float(self.temperature) > 0:
            raise ConfigError(f"train.temperature={self.temperature} must be > 0")


def model_device(model: nn.Module) -> torch.device:
    """The device a model lives on (its first parameter or buffer)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode with requires_grad False (a search must not
    train it); flags and every submodule's own mode restored on exit."""
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        for m, mode in zip(model.modules(), modes):
            m.training = mode


_BATCHNORMS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")


def _is_batchnorm(m: nn.Module) -> bool:
    """A BatchNorm layer, also inside a loaded TorchScript model (whose submodules keep only their original name)
    or a torch.export program (a marker module per BatchNorm node)."""
    return isinstance(m, (nn.modules.batchnorm._BatchNorm, ProgramBatchNorm)) or getattr(m, "original_name", None) in _BATCHNORMS


def augment(x: torch.Tensor, crop_pad: int, flip: bool, rng: torch.Generator) -> torch.Tensor:
    """Random crop with reflect padding and random horizontal flip, batched."""
    n, _, h, w = x.shape
    if crop_pad > 0:
        padded = nn.functional.pad(x, (crop_pad,) * 4, mode="reflect")
        off = torch.randint(0, 2 * crop_pad + 1, (n, 2), generator=rng).to(x.device)
        rows = (off[:, 0, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (off[:, 1, None] + torch.arange(w, device=x.device))[:, None, None, :]
        idx = torch.arange(n, device=x.device)[:, None, None, None]
        ch = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[idx, ch, rows, cols]
    if flip:
        mask = (torch.rand(n, generator=rng) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def train_classifier(
    model: nn.Module,
    data: ImageSet,
    cfg: TrainConfig,
    rng: torch.Generator,
    batch_hook: BatchHook | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    teacher: nn.Module | None = None,
    epoch_end: Callable[[], None] | None = None,
) -> list[float]:
    """Train in place; returns the mean loss of each epoch.

    ``rng`` drives shuffling, augmentation and the hook's randomness,
    so a run is reproducible from its seed. ``progress(step, total, loss)``
    is called after every step. With a ``teacher`` and ``cfg.distill`` > 0
    the loss adds ``distill * T^2 * KL(teacher || model)`` at temperature T,
    the teacher seeing each image as it was before the hook: a repair then
    learns the original model's answer on the clean version of a triggered
    image (its behaviour off the backdoor) instead of the hard label alone.
    ``cfg.batchnorm="frozen"`` keeps every BatchNorm layer in eval mode, so
    its running statistics stay those the model came with. ``epoch_end()`` is
    called after every epoch (a last partial one included), the model in
    whatever mode it trains in.
    """
    device = model_device(model)
    n = len(data)
    if n == 0:
        raise ConfigError("cannot train on an empty data set")
    bs = min(int(cfg.batch_size), n)
    steps_per_epoch = math.ceil(n / bs)
    total = max(1, int(round(float(cfg.epochs) * steps_per_epoch)))
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.schedule == "onecycle":
        # OneCycleLR divides by zero for a one-step warm-up (pct_start * total_steps == 1).
        pct = 0.3 if 0.25 * total == 1 else 0.25
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=pct)
    elif cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    else:
        sched = None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=float(cfg.label_smoothing))
    # Dropout draws from torch's global RNG: fork it and seed it from
    # ``rng`` so the run repeats from its seed without touching the
    # caller's global state.
    devices = [device.index or 0] if device.type == "cuda" else []
    was_training = model.training
    try:
        model.train()
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=rng)))
            if cfg.batchnorm == "frozen":
                for m in model.modules():
                    if _is_batchnorm(m):
                        m.eval()
            distill = (teacher, float(cfg.distill), float(cfg.temperature)) if teacher is not None and float(cfg.distill) > 0 else None
            return _loop(model, data, cfg, rng, batch_hook, progress, opt, sched, loss_fn, bs, total, distill, epoch_end)
    finally:
        model.train(was_training)
        if cfg.channels_last:
            model.to(memory_format=torch.contiguous_format)


def _loop(
    model: nn.Module,
    data: ImageSet,
    cfg: TrainConfig,
    rng: torch.Generator,
    batch_hook: BatchHook | None,
    progress: Callable[[int, int, float], None] | None,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
    loss_fn: nn.Module,
    bs: int,
    total: int,
    distill: tuple[nn.Module, float, float] | None = None,
    epoch_end: Callable[[], None] | None = None,
) -> list[float]:
    device = model_device(model)
    n = len(data)
    losses: list[float] = []
    step, epoch_loss, epoch_count = 0, 0.0, 0
    while step < total:
        order = torch.randperm(n, generator=rng)
        for start in range(0, n, bs):
            if step >= total:
                break
            idx = order[start : start + bs]
            x = data.x[idx].to(device, non_blocking=True)
            y = data.y[idx].to(device, non_blocking=True)
            x = augment(x, int(cfg.crop_pad), bool(cfg.flip), rng)
            soft = None
            if distill is not None:
                with torch.no_grad():
                    soft = log_softmax(distill[0](x).float() / distill[2], dim=1)
            if batch_hook is not None:
                x, y, *source = batch_hook(x, y, rng)
                if source and soft is not None:
                    soft = soft[source[0]]  # an added row learns the teacher's answer on the image it was made from
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = loss_fn(out, y)
            if soft is not None:
                _, weight, temp = distill
                kl = kl_div(log_softmax(out.float() / temp, dim=1), soft, log_target=True, reduction="batchmean")
                loss = loss + weight * temp**2 * kl
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            lv = float(loss.detach())
            epoch_loss += lv * len(y)
            epoch_count += len(y)
            if progress is not None:
                progress(step, total, lv)
        losses.append(epoch_loss / max(1, epoch_count))
        epoch_loss, epoch_count = 0.0, 0
        if epoch_end is not None:
            epoch_end()
    return losses
