"""What several commands share: start-up of a run, model and data loading,
progress bars, example pictures and printed tables. Typed settings in, no
DictConfig."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gdm_ray.cli.settings import ArchSpec, ModelReading, RunSettings
from gdm_ray.core.allocator import keep_freed_memory
from gdm_ray.core.data import DataSpec, Splits, load_splits
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.metrics import predict
from gdm_ray.core.plots import save_examples
from gdm_ray.core.triggers import Trigger
from gdm_ray.core.weights import LoadOptions
from gdm_ray.store.s3 import S3Config

__all__ = ["setup", "model_file", "load_options", "load_data", "progress_bar", "write_examples", "print_table", "card_for", "Progress"]

Progress = Callable[[int, int, float], None]


def setup(run: RunSettings) -> torch.device:
    """Seed the global RNGs (entry point only), pin threads, keep freed memory, pick the device."""
    random.seed(run.seed)
    np.random.seed(run.seed % 2**32)
    torch.manual_seed(run.seed)
    if run.threads:
        torch.set_num_threads(int(run.threads))
    keep_freed_memory(run.keep_freed_memory)
    dev = run.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={dev}: CUDA is not available on this machine")
    return torch.device(dev)


def load_options(arch: ArchSpec | None, model: ModelReading) -> LoadOptions:
    """How to read model files: the arch group (for state dicts) and the model group's reading keys."""
    from gdm_ray.store.fetch import cache_root

    return LoadOptions(
        arch=arch.name if arch else None,
        width=arch.width if arch else None,
        key_map=tuple(model.key_map),
        mean=tuple(arch.mean) if arch and arch.mean is not None else None,
        std=tuple(arch.std) if arch and arch.std is not None else None,
        allow_pickle=bool(model.allow_pickle),
        cache_dir=str(cache_root() / "models"),
    )


def model_file(uri: str, store: S3Config, key: str = "model") -> Path:
    """A model location as a local file: an s3:// object is fetched (with its
    card, the same name with .json, when one is beside it); a missing file
    fails before the slow data load."""
    from gdm_ray.store.fetch import localize
    from gdm_ray.store.s3 import S3, is_s3

    if is_s3(uri):
        path = localize(uri, store, what=key)
        card = uri.rsplit(".", 1)[0] + ".json" if "." in uri.rsplit("/", 1)[-1] else uri + ".json"
        if path.is_file() and S3(store).exists(card):
            localize(card, store, what=key)
        else:
            path.with_suffix(".json").unlink(missing_ok=True)
    else:
        path = Path(uri)
    if not path.is_file():
        raise ConfigError(f"{key}={uri}: no such file")
    return path


def load_data(spec: DataSpec) -> Splits:
    return load_splits(spec)


def progress_bar(enabled: bool, desc: str) -> tuple[Progress | None, Callable[[], None]]:
    """A train-loop progress callback backed by tqdm on stderr; returns (callback, close)."""
    if not enabled:
        return None, lambda: None
    bar = tqdm(total=0, desc=desc, unit="step", file=sys.stderr, mininterval=1.0, leave=False, dynamic_ncols=True)

    def update(step: int, total: int, loss: float) -> None:
        if bar.total != total:
            bar.total = total
        bar.n = step
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.refresh() if step == total else bar.update(0)

    return update, bar.close


def sample_images(splits: Splits, k: int, seed: int) -> torch.Tensor:
    rng = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(splits.eval), generator=rng)[:k]
    return splits.eval.x[idx]


def write_examples(path: Path, model: torch.nn.Module, splits: Splits, trigger: Trigger, title: str, seed: int) -> None:
    clean = sample_images(splits, 6, seed)
    triggered = trigger.apply(clean, torch.Generator().manual_seed(seed))
    names = splits.classes
    cp = [names[int(i)] for i in predict(model, clean)]
    tp = [names[int(i)] for i in predict(model, triggered)]
    save_examples(path, clean, triggered, cp, tp, trigger.pattern, trigger.mask, title)


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")


def card_for(model_path: Path) -> dict[str, Any]:
    """The model card (model.json beside the model), or {} when there is none.
    A relative trigger.path (a png trigger shipped beside the card) is read
    relative to the card's folder, so a zoo folder can move."""
    card = model_path.with_suffix(".json")
    if card.is_file():
        try:
            data = json.loads(card.read_text())
        except (OSError, json.JSONDecodeError):
            raise ConfigError(f"model card {card} is not valid JSON") from None
        trigger = data.get("trigger") if isinstance(data, dict) else None
        if isinstance(trigger, dict) and trigger.get("path") and not Path(str(trigger["path"])).is_absolute():
            trigger["path"] = str(card.parent / str(trigger["path"]))
        return data
    return {}
