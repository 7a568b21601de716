"""`gdm-ray attack`: train a backdoored classifier (BadNets poisoning)."""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import torch

from gdm_ray.cli.common import load_data, print_table, progress_bar, setup, write_examples
from gdm_ray.cli.settings import AttackSettings, plain
from gdm_ray.core.attack import AttackResult, BadNets
from gdm_ray.core.data import Splits
from gdm_ray.core.model_io import file_sha256, load_model, save_torchscript
from gdm_ray.core.models import build_model
from gdm_ray.core.triggers import make_trigger
from gdm_ray.store import RunDir, code_version, config_hash, write_json

__all__ = ["attack"]


def attack(s: AttackSettings) -> dict[str, Any]:
    """Train a backdoored model and write model.pt, model.json and examples.png."""
    device = setup(s)
    splits = load_data(s.data)
    c, h, w = splits.shape
    trigger = make_trigger(s.trigger, c, (h, w))
    target = s.attack.target_class
    with RunDir(s.out, "attack", s.store) as run_dir:
        model, arch, width, init_sha = _initial_model(s, splits, device)
        print(
            f"gdm-ray attack: {splits.name} ({len(splits.train)} train images, {c}x{h}x{w}), trigger {s.trigger.family} "
            f"{trigger.size[0]}x{trigger.size[1]} {s.trigger.placement}, target class {target}, rate {s.attack.rate}",
            file=sys.stderr,
        )
        update, close = progress_bar(s.progress, "attack")
        try:
            rng = torch.Generator().manual_seed(s.seed)
            result = BadNets(trigger, target, s.attack.rate).fit(model, splits.train, splits.eval, s.train, rng, update)
        finally:
            close()
        save_torchscript(model, run_dir.path("model.pt"), (c, h, w), {"arch": arch, "width": width, "target": target})
        card = _card(s, splits, result, arch, width, init_sha)
        card["sha256"] = file_sha256(run_dir.path("model.pt"))
        write_json(run_dir.path("model.json"), card)
        write_examples(
            run_dir.path("examples.png"),
            model,
            splits,
            trigger,
            f"{s.trigger.family} -> class {target} ({splits.classes[target]}): ASR {result.asr:.1%}",
            s.seed,
        )
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


def _initial_model(s: AttackSettings, splits: Splits, device: torch.device) -> tuple[torch.nn.Module, str, int | None, str | None]:
    """A new model of s.arch, or the model at attack.init to fine-tune: (module, arch, width, init sha256)."""
    if s.attack.init:
        loaded = load_model(s.attack.init, splits.shape, splits.train.num_classes, device=device)
        return loaded.module, loaded.meta.get("arch", "torchscript"), loaded.meta.get("width"), loaded.sha256
    c = splits.shape[0]
    return build_model(s.arch.name, c, splits.train.num_classes, s.arch.width).to(device), s.arch.name, s.arch.width, None


def _card(s: AttackSettings, splits: Splits, result: AttackResult, arch: str, width: int | None, init_sha: str | None) -> dict:
    """model.json: what the model is and how it was made (its trigger and target class included)."""
    return {
        "model": "model.pt",
        "arch": arch,
        "width": width,
        "input_shape": list(splits.shape),
        "num_classes": splits.train.num_classes,
        "classes": splits.classes,
        "data": splits.name,
        "trigger": dataclasses.asdict(s.trigger),
        "target_class": s.attack.target_class,
        "target": s.attack.target_class,  # the key cards had before target_class: older readers look for it
        "rate": s.attack.rate,
        "init": s.attack.init,
        "init_sha256": init_sha,
        "clean_accuracy": result.clean_accuracy,
        "asr": result.asr,
        "train_seconds": round(result.train_seconds, 2),
        "epochs": s.train.epochs,
        "seed": s.seed,
        "config_hash": config_hash(plain(s)),
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
