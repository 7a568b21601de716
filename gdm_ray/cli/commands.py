"""Command bodies: plain functions from a composed config to a metrics dict.

They turn config nodes into the core's typed specs, run the core, and write
through gdm_ray.store; no science lives here.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from gdm_ray.core.allocator import keep_freed_memory
from gdm_ray.core.attack import BadNets
from gdm_ray.core.data import DataSpec, Splits, load_splits
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.metrics import attack_success_rate, clean_accuracy, predict
from gdm_ray.core.model_io import load_model, save_torchscript
from gdm_ray.core.models import build_model
from gdm_ray.core.plots import save_examples
from gdm_ray.core.train import TrainConfig
from gdm_ray.core.triggers import Trigger, TriggerSpec, make_trigger
from gdm_ray.store import RunDir, code_version, config_hash, write_json

__all__ = ["run", "attack", "evaluate"]

T = TypeVar("T")


def run(command: str, cfg: DictConfig) -> dict[str, Any]:
    from gdm_ray.cli.demo import demo
    from gdm_ray.cli.scan import scan
    from gdm_ray.cli.search import defend, search
    from gdm_ray.cli.serve import serve
    from gdm_ray.cli.sweep import sweep
    from gdm_ray.cli.zoo import zoo_scan

    fn = {"attack": attack, "evaluate": evaluate, "demo": demo, "search": search, "defend": defend, "scan": scan,
          "zoo-scan": zoo_scan, "sweep": sweep, "serve": serve}[command]  # fmt: skip
    return fn(cfg)


# --- shared plumbing -------------------------------------------------------------


def typed(cls: type[T], node: Any, group: str) -> T:
    """Build a core dataclass from a config node; unknown keys are a clear error."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{group}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    for name, value in values.items():
        kind = _scalar_kind(fields[name])
        if kind is not None and value is not None and not _is_kind(value, kind):
            raise ConfigError(f"{group}.{name}={value!r} is not {'an' if kind is int else 'a'} {kind.__name__}")
    return cls(**values)


def _scalar_kind(f: dataclasses.Field) -> type | None:
    """int/float/bool/str for scalar fields (judged by the annotation text), else None."""
    ann = str(f.type).replace(" | None", "")
    return {"int": int, "float": float, "bool": bool, "str": str}.get(ann)


def _is_kind(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def setup(cfg: DictConfig) -> torch.device:
    """Seed the global RNGs (entry point only), pin threads, keep freed memory, pick the device."""
    seed = int(cfg.seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    keep = cfg.get("keep_freed_memory", True)
    if not isinstance(keep, bool):
        raise ConfigError(f"keep_freed_memory={keep!r} must be true or false")
    keep_freed_memory(keep)
    dev = str(cfg.get("device", "auto"))
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={dev}: CUDA is not available on this machine")
    return torch.device(dev)


_SECRETS = ("access_key_id", "secret_access_key", "session_token")


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data, S3 credentials masked (it is written into outputs)."""
    out = OmegaConf.to_container(cfg, resolve=True)
    store = out.get("store") if isinstance(out, dict) else None
    if isinstance(store, dict):
        out["store"] = {k: ("***" if k in _SECRETS and v else v) for k, v in store.items()}
    return out  # type: ignore[return-value]


def store_of(cfg: DictConfig) -> dict[str, Any] | None:
    """The ``store`` config node (S3 endpoint and credentials) as a plain dict."""
    node = cfg.get("store")
    return OmegaConf.to_container(node, resolve=True) if node is not None else None  # type: ignore[return-value]


def model_file(cfg: DictConfig, key: str = "model") -> Path:
    """model= as a local file: an s3:// object is fetched (with its card, the
    same name with .json, when one is beside it); a missing file fails before
    the slow data load."""
    from gdm_ray.store.fetch import localize
    from gdm_ray.store.s3 import S3, is_s3

    uri = str(OmegaConf.select(cfg, key, throw_on_missing=True))
    if is_s3(uri):
        store = store_of(cfg)
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


def progress_bar(cfg: DictConfig, desc: str):
    """A train-loop progress callback backed by tqdm on stderr; returns (callback, close)."""
    if not cfg.get("progress", True):
        return None, lambda: None
    bar = tqdm(total=0, desc=desc, unit="step", file=sys.stderr, mininterval=1.0, leave=False, dynamic_ncols=True)

    def update(step: int, total: int, loss: float) -> None:
        if bar.total != total:
            bar.total = total
        bar.n = step
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.refresh() if step == total else bar.update(0)

    return update, bar.close


def load_data(cfg: DictConfig) -> Splits:
    return load_splits(typed(DataSpec, cfg.data, "data"))


def sample_images(splits: Splits, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(splits.eval), generator=g)[:k]
    return splits.eval.x[idx]


def write_examples(path: Path, model: torch.nn.Module, splits: Splits, trigger: Trigger, title: str, seed: int) -> None:
    clean = sample_images(splits, 6, seed)
    triggered = trigger.apply(clean, torch.Generator().manual_seed(seed))
    names = splits.classes
    cp = [names[int(i)] for i in predict(model, clean)]
    tp = [names[int(i)] for i in predict(model, triggered)]
    save_examples(path, clean, triggered, cp, tp, trigger.pattern, trigger.alpha, title)


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")


# --- commands ---------------------------------------------------------------------


def attack(cfg: DictConfig) -> dict[str, Any]:
    """Train a backdoored model and write model.pt, model.json and examples.png."""
    device = setup(cfg)
    splits = load_data(cfg)
    c, h, w = splits.shape
    spec = typed(TriggerSpec, cfg.trigger, "trigger")
    trigger = make_trigger(spec, c, (h, w))
    train_cfg = typed(TrainConfig, cfg.train, "train")
    target, rate = int(cfg.attack.target), float(cfg.attack.rate)
    badnets = BadNets(trigger, target, rate)
    with RunDir(cfg.get("out"), "attack", store_of(cfg)) as run_dir:
        if cfg.attack.get("init"):
            loaded = load_model(cfg.attack.init, (c, h, w), splits.train.num_classes, device=device)
            model, arch, width = loaded.module, loaded.meta.get("arch", "torchscript"), loaded.meta.get("width")
            init_sha = loaded.sha256
        else:
            arch, width = str(cfg.arch.name), cfg.arch.get("width")
            model = build_model(arch, c, splits.train.num_classes, width).to(device)
            init_sha = None
        gen = torch.Generator().manual_seed(int(cfg.seed))
        print(
            f"gdm-ray attack: {splits.name} ({len(splits.train)} train images, {c}x{h}x{w}), "
            f"trigger {spec.family} {trigger.size[0]}x{trigger.size[1]} {spec.placement}, target {target}, rate {rate}",
            file=sys.stderr,
        )
        update, close = progress_bar(cfg, "attack")
        try:
            result = badnets.fit(model, splits.train, splits.eval, train_cfg, gen, update)
        finally:
            close()
        card = {
            "model": "model.pt",
            "arch": arch,
            "width": width,
            "input_shape": [c, h, w],
            "num_classes": splits.train.num_classes,
            "classes": splits.classes,
            "data": splits.name,
            "trigger": dataclasses.asdict(spec),
            "target": target,
            "rate": rate,
            "init": cfg.attack.get("init"),
            "init_sha256": init_sha,
            "clean_accuracy": result.clean_accuracy,
            "asr": result.asr,
            "train_seconds": round(result.train_seconds, 2),
            "epochs": train_cfg.epochs,
            "seed": int(cfg.seed),
            "config_hash": config_hash(plain(cfg)),
            "code_version": code_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        save_torchscript(model, run_dir.path("model.pt"), (c, h, w), {"arch": arch, "width": width, "target": target})
        from gdm_ray.core.model_io import file_sha256

        card["sha256"] = file_sha256(run_dir.path("model.pt"))
        write_json(run_dir.path("model.json"), card)
        write_examples(
            run_dir.path("examples.png"), model, splits, trigger,
            f"{spec.family} -> class {target} ({splits.classes[target]}): ASR {result.asr:.1%}", int(cfg.seed),
        )  # fmt: skip
    print_table(
        [
            ("clean accuracy", f"{result.clean_accuracy:.2%}"),
            ("attack success rate", f"{result.asr:.2%}"),
            ("train seconds", f"{result.train_seconds:.1f}"),
            ("model", run_dir.join("model.pt")),
        ]
    )
    print(f"wrote {run_dir.location}")
    return {**card, "out": run_dir.location}


def card_for(model_path: Path) -> dict[str, Any]:
    import json

    card = model_path.with_suffix(".json")
    if card.is_file():
        try:
            return json.loads(card.read_text())
        except (OSError, json.JSONDecodeError):
            raise ConfigError(f"model card {card} is not valid JSON") from None
    return {}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Clean accuracy and ASR of model= for a trigger (default: the one on its card)."""
    device = setup(cfg)
    model_path = model_file(cfg)
    splits = load_data(cfg)
    c, h, w = splits.shape
    arch = cfg.arch.name if cfg.get("arch") else None
    loaded = load_model(model_path, (c, h, w), splits.eval.num_classes, arch=arch, device=device)
    card = card_for(model_path)
    if cfg.get("trigger") is not None:
        spec = typed(TriggerSpec, cfg.trigger, "trigger")
    elif card.get("trigger"):
        spec = typed(TriggerSpec, card["trigger"], "model card trigger")
    else:
        raise ConfigError(f"model={model_path}: no card beside it; pass trigger=... (e.g. trigger=bw3x3) and target=...")
    target = cfg.get("target")
    target = int(card["target"]) if target is None and "target" in card else target
    if target is None:
        raise ConfigError(f"model={model_path}: no target class on a card; pass target=N")
    if not 0 <= int(target) < loaded.num_classes:
        raise ConfigError(f"target={target} is not a class of the model (0..{loaded.num_classes - 1})")
    split = str(cfg.get("split", "eval"))
    if split not in ("eval", "defense", "train"):
        raise ConfigError(f"split={split!r} must be eval, defense or train")
    part = getattr(splits, split)
    trigger = make_trigger(spec, c, (h, w))
    acc = clean_accuracy(loaded.module, part)
    asr = attack_success_rate(loaded.module, part, trigger, int(target), torch.Generator().manual_seed(int(cfg.seed)))
    metrics = {
        "model": str(model_path),
        "model_sha256": loaded.sha256,
        "data": splits.name,
        "split": split,
        "images": len(part),
        "trigger": dataclasses.asdict(spec),
        "target": int(target),
        "clean_accuracy": acc,
        "asr": asr,
        "config_hash": config_hash(plain(cfg)),
        "code_version": code_version(),
    }
    with RunDir(cfg.get("out"), "evaluate", store_of(cfg)) as run_dir:
        write_json(run_dir.path("metrics.json"), metrics)
        write_examples(
            run_dir.path("examples.png"), loaded.module, splits, trigger,
            f"{model_path.name}: {spec.family} -> class {target}, ASR {asr:.1%}", int(cfg.seed),
        )  # fmt: skip
    print(f"gdm-ray evaluate: {model_path} on {splits.name}/{split} ({len(part)} images)")
    print_table([("clean accuracy", f"{acc:.2%}"), ("attack success rate", f"{asr:.2%}")])
    print(f"wrote {run_dir.location}")
    return {**metrics, "out": run_dir.location}
