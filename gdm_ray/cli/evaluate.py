"""`gdm-ray evaluate`: clean accuracy and attack success rate of a model for a trigger."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from gdm_ray.cli.common import card_for, load_data, load_options, model_file, print_table, setup, write_examples
from gdm_ray.cli.settings import EvaluateSettings, build, plain
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.metrics import attack_success_rate, clean_accuracy
from gdm_ray.core.model_io import load_model
from gdm_ray.core.triggers import TriggerSpec, make_trigger
from gdm_ray.store import RunDir, code_version, config_hash, write_json

__all__ = ["evaluate", "card_trigger"]


def card_trigger(spec: TriggerSpec | None, target_class: int | None, model_path: Path) -> tuple[TriggerSpec, int]:
    """The trigger and target class to measure: the given ones, else the model card's."""
    card = card_for(model_path)
    if spec is None:
        if not card.get("trigger"):
            raise ConfigError(f"model={model_path}: no card beside it; pass trigger=... (e.g. trigger=bw3x3) and target_class=...")
        spec = build(TriggerSpec, card["trigger"], "model card trigger")
    if target_class is None:
        target_class = card.get("target_class", card.get("target"))
        if target_class is None:
            raise ConfigError(f"model={model_path}: no target class on a card; pass target_class=N")
    return spec, int(target_class)


def evaluate(s: EvaluateSettings) -> dict[str, Any]:
    """Clean accuracy and ASR of model= for a trigger (default: the one on its card)."""
    device = setup(s)
    model_path = model_file(s.model.path, s.store)
    splits = load_data(s.data)
    c, h, w = splits.shape
    loaded = load_model(model_path, (c, h, w), splits.eval.num_classes, device=device, options=load_options(s.arch, s.model))
    spec, target = card_trigger(s.trigger, s.target_class, model_path)
    if not 0 <= target < loaded.num_classes:
        raise ConfigError(f"target_class={target} is not a class of the model (0..{loaded.num_classes - 1})")
    part = getattr(splits, s.split)
    trigger = make_trigger(spec, c, (h, w))
    acc = clean_accuracy(loaded.module, part)
    asr = attack_success_rate(loaded.module, part, trigger, target, torch.Generator().manual_seed(s.seed))
    metrics = {
        "model": str(model_path),
        "model_sha256": loaded.sha256,
        "data": splits.name,
        "split": s.split,
        "images": len(part),
        "trigger": dataclasses.asdict(spec),
        "target_class": target,
        "clean_accuracy": acc,
        "asr": asr,
        "config_hash": config_hash(plain(s)),
        "code_version": code_version(),
    }
    with RunDir(s.out, "evaluate", s.store) as run_dir:
        write_json(run_dir.path("metrics.json"), metrics)
        write_examples(
            run_dir.path("examples.png"),
            loaded.module,
            splits,
            trigger,
            f"{model_path.name}: {spec.family} -> class {target}, ASR {asr:.1%}",
            s.seed,
        )
    print(f"gdm-ray evaluate: {model_path} on {splits.name}/{s.split} ({len(part)} images)")
    print_table([("clean accuracy", f"{acc:.2%}"), ("attack success rate", f"{asr:.2%}")])
    print(f"wrote {run_dir.location}")
    return {**metrics, "out": run_dir.location}
