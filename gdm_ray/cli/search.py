"""`gdm-ray search` and `gdm-ray defend`: the trigger search and the repair
(gdm_ray.core.repair), their pictures, artifacts and tables. ``defend
method=finetune`` is the floor a repair must beat: no search, plain
fine-tuning on the same clean images with the same defense budget."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from gdm_ray.cli.common import card_for, load_data, load_options, model_file, print_table, progress_bar, setup
from gdm_ray.cli.settings import DefendSettings, SearchSettings, build, plain
from gdm_ray.core.baseline import save_trigger
from gdm_ray.core.data import Splits
from gdm_ray.core.defense import TriggerSampler
from gdm_ray.core.ensemble import save_ensemble
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.metrics import EVAL_SEED_OFFSET, sampled_asr
from gdm_ray.core.model_io import LoadedModel, file_sha256, load_model, save_like
from gdm_ray.core.plots import save_curves, save_level_grid, save_pca_scatter
from gdm_ray.core.repair import RepairResult, Search, measure, repair, search_triggers
from gdm_ray.core.triggers import Trigger, TriggerSpec, make_trigger
from gdm_ray.store import REPAIR_SCHEMA, RunDir, code_version, config_hash, write_json
from gdm_ray.store.repair_rows import repair_row
from gdm_ray.store.scanstate import ScanState

__all__ = ["search", "defend", "run_search", "real_trigger"]


def _load(s: SearchSettings, device: torch.device) -> tuple[LoadedModel, Splits]:
    """The model and the data; the target class checked against the model."""
    path = model_file(s.model.path, s.store)
    splits = load_data(s.data)
    loaded = load_model(path, splits.shape, splits.eval.num_classes, device=device, options=load_options(s.arch, s.model))
    if s.target_class != "auto" and not 0 <= s.target_class < loaded.num_classes:
        raise ConfigError(f"target_class={s.target_class} is not a class of the model (0..{loaded.num_classes - 1})")
    return loaded, splits


def run_search(s: SearchSettings, loaded: LoadedModel, splits: Splits, run_dir: RunDir, rng: torch.Generator) -> tuple[Search, dict]:
    """MESA or the baseline on the defense split; its artifact and pictures in
    run_dir (drawn from ``rng`` after the search); the search's summary."""
    update, close = progress_bar(s.progress, f"{s.method} search")
    try:
        found = search_triggers(s.method, loaded.module, splits.defense, s.target_class, s.mesa, s.baseline, rng, update)
    finally:
        close()
    name = Path(loaded.path).name
    if found.mesa is not None:
        summary = _write_mesa(s, found, loaded, run_dir, rng, name)
    else:
        b = found.baseline
        save_level_grid(
            run_dir.path("samples.png"),
            [(b.pattern[None], b.mask[None])],
            f"{name}: baseline trigger for class {s.target_class}",
            [f"ASR {b.asr:.0%}"],
        )
        save_trigger(b, run_dir.path("trigger.safetensors"))
        summary = {"method": "baseline", "found_asr_search": b.asr, "restart_asr": b.restart_asr}
    summary.update({"search_seconds": round(found.seconds, 2), "target_class": s.target_class})
    return found, summary


def _write_mesa(s: SearchSettings, found: Search, loaded: LoadedModel, run_dir: RunDir, rng: torch.Generator, name: str) -> dict:
    """The ensemble artifact and its pictures: samples per level, their PCA, the training curves."""
    mesa, result, k = found.sampler, found.mesa, s.samples_per_level
    save_ensemble(mesa, result, run_dir.path("ensemble"), loaded.sha256, {"source_model": loaded.path, "code_version": code_version()})
    per_level = [mesa.sample(max(k, 200), rng=rng, level=i) for i in range(result.generators.levels)]
    labels = [f"L{i} b={b:.2f}\nASR {a:.0%}" for i, (b, a) in enumerate(zip(result.betas, result.asr))]
    save_level_grid(
        run_dir.path("samples.png"),
        [(p[:k], m[:k]) for p, m in per_level],
        f"{name}: MESA triggers for class {s.target_class}, one row per level",
        labels,
    )
    flat = [torch.cat([p.flatten(1), m.flatten(1)], 1) if mesa.config.with_mask else p for p, m in per_level]
    save_pca_scatter(run_dir.path("pca.png"), flat, f"{name}: samples by level (PCA)")
    save_curves(run_dir.path("curves.png"), result.history, f"{name}: MESA training, class {s.target_class}")
    return {
        "method": "mesa",
        "levels": result.generators.levels,
        "betas": result.betas,
        "alpha": result.alpha,
        "level_asr": result.asr,
        "entropy": result.entropy,
        "weights": result.weights,
        "steps": result.steps,
        "trigger_size": list(mesa.config.trigger_size),
        "position": mesa.config.position,
        "with_mask": bool(mesa.config.with_mask),
        "extent": result.extent,
        "level_alpha": result.level_alpha,
        "restarted": result.restarted,
    }


def search(s: SearchSettings) -> dict[str, Any]:
    """Search the valid triggers of target_class and write them out."""
    device = setup(s)
    loaded, splits = _load(s, device)
    rng = torch.Generator().manual_seed(s.seed)
    print(f"gdm-ray search: {loaded.path}, class {s.target_class}, {s.method} on {len(splits.defense)} clean images", file=sys.stderr)
    with RunDir(s.out, "search", s.store) as run_dir:
        found, summary = run_search(s, loaded, splits, run_dir, rng)
        summary["found_asr_eval"] = sampled_asr(loaded.module, splits.eval, found.sampler, s.target_class, rng)
        summary.update(
            {"model": loaded.path, "model_sha256": loaded.sha256, "config_hash": config_hash(plain(s)), "code_version": code_version()}
        )
        write_json(run_dir.path("search.json"), summary)
    rows = [
        ("method", s.method),
        ("found triggers' ASR (eval)", f"{summary['found_asr_eval']:.2%}"),
        ("search seconds", f"{summary['search_seconds']:.1f}"),
    ]
    if s.method == "mesa":
        rows.insert(1, ("level ASR", ", ".join(f"{a:.0%}" for a in summary["level_asr"])))
    print_table(rows)
    print(f"wrote {run_dir.location}")
    return {**summary, "out": run_dir.location}


def real_trigger(
    spec: TriggerSpec | None, target_class: Any, model_path: Path, splits: Splits
) -> tuple[Trigger | None, int | None, dict | None]:
    """The trigger the model was actually poisoned with, when known (trigger= or the model card)."""
    card = card_for(model_path)
    card_target = card.get("target_class", card.get("target"))
    if spec is not None:
        if target_class == "auto" and card_target is None:
            raise ConfigError("trigger=... with target_class=auto: the model has no card naming its real target class")
        target = int(card_target) if target_class == "auto" else int(target_class)
    elif card.get("trigger"):
        spec, target = build(TriggerSpec, card["trigger"], "model card trigger"), int(card_target)
    else:
        return None, None, None
    c, h, w = splits.shape
    return make_trigger(spec, c, (h, w)), target, dataclasses.asdict(spec)


def _find(
    s: DefendSettings, loaded: LoadedModel, splits: Splits, run_dir: RunDir, rng: torch.Generator, state: ScanState | None
) -> tuple[dict[int, TriggerSampler], dict]:
    """The triggers to repair against: one class's search, or (target_class=auto) every flagged class's MESA;
    none for finetune, which searches nothing (any target_class, auto included: no scan)."""
    if s.method == "finetune":
        found = search_triggers("finetune", loaded.module, splits.defense, s.target_class, None, None, rng)
        return {}, {"method": "finetune", "search_seconds": round(found.seconds, 2), "target_class": s.target_class}
    if s.target_class != "auto":
        found, summary = run_search(s, loaded, splits, run_dir, rng)
        return {s.target_class: found.sampler}, summary
    from gdm_ray.cli.scan import scan_one_model, scan_settings_from
    from gdm_ray.store.rows import Provenance

    prov = Provenance(config_hash(plain(s)), code_version())
    verdict, _, samplers = scan_one_model(scan_settings_from(s, s.model), loaded, splits, run_dir, state, provenance=prov)
    return dict(samplers), {"method": "mesa", "scan": verdict, "search_seconds": round(verdict["seconds"], 2)}


def defend(s: DefendSettings) -> dict[str, Any]:
    """Search (or, with target_class=auto, scan every class), then retrain
    against the found triggers of every target (method=finetune: no search,
    retrain on the clean images alone); write the repaired model and metrics."""
    device = setup(s)
    loaded, splits = _load(s, device)
    real, real_target, real_spec = real_trigger(s.trigger, s.target_class, Path(loaded.path), splits)
    rng, eval_seed = torch.Generator().manual_seed(s.seed), s.seed + EVAL_SEED_OFFSET
    finetune = s.method == "finetune"
    if finetune:
        what = "no trigger search (plain fine-tuning)"
    else:
        what = "every class (target_class=auto)" if s.target_class == "auto" else f"class {s.target_class}"
    print(
        f"gdm-ray defend: {loaded.path}, {what}, {s.method}; {'retrain' if finetune else 'search and retrain'} on "
        f"{len(splits.defense)} clean images, metrics on {len(splits.eval)} held-out images",
        file=sys.stderr,
    )
    state: ScanState | None = None
    with RunDir(s.out, "defend", s.store, s.dataset) as run_dir:
        if s.target_class == "auto" and not finetune and s.out:
            state = ScanState(run_dir.state_dir())  # resumes the first pass
        samplers, summary = _find(s, loaded, splits, run_dir, rng, state)
        metrics = _metrics(s, loaded, splits, list(samplers), real_spec, real_target, summary)
        if samplers or finetune:
            update, close = progress_bar(s.progress, "retrain")
            try:
                args = (loaded.module, splits.defense, splits.eval, samplers, s.defense, rng, eval_seed, real, real_target, update)
                fixed = repair(*args, finetune=finetune)
            finally:
                close()
            _write_repaired(run_dir, fixed, loaded, splits, s.method, metrics)
        else:  # the scan found no backdoor: nothing to repair, no model written
            before = measure(loaded.module, splits.eval, {}, eval_seed, real, real_target)
            metrics.update(before=before.as_dict(), after=None, der=None, retrain_seconds=0.0, repaired_sha256=None)
        row = repair_row(metrics, Path(loaded.path).stem, run_dir.join(metrics.get("repaired_model") or "model.pt"))
        run_dir.write_table("repair.parquet", [row], REPAIR_SCHEMA, "repairs")
        write_json(run_dir.path("metrics.json"), metrics)
    if state is not None:
        state.clear()  # published: nothing left to resume
    _print_repair(metrics, run_dir)
    return {**metrics, "out": run_dir.location}


def _metrics(s: DefendSettings, loaded: LoadedModel, splits: Splits, targets: list[int], real_spec: dict | None,
             real_target: int | None, summary: dict) -> dict[str, Any]:  # fmt: skip
    """metrics.json's head: what was repaired, against which triggers, with which settings."""
    return {
        "model": loaded.path, "model_sha256": loaded.sha256, "method": s.method, "target_class": s.target_class,
        "targets": targets, "real_trigger": real_spec, "real_target": real_target, "search": summary,
        "defense": dataclasses.asdict(s.defense), "eval_images": len(splits.eval),
        "config_hash": config_hash(plain(s)), "code_version": code_version(),
    }  # fmt: skip


def _write_repaired(run_dir: RunDir, fixed: RepairResult, loaded: LoadedModel, splits: Splits, method: str, metrics: dict) -> None:
    """The repaired model in the run folder, in the format the model came in (model.pt, model.pt2 or
    model.safetensors), and the before/after figures into metrics."""
    written = save_like(
        fixed.repaired,
        run_dir.path("model"),
        loaded.meta,
        splits.shape,
        {"repaired_from": loaded.sha256, "method": method, "target_classes": fixed.targets},
    )
    metrics.update(
        before=fixed.before.as_dict(),
        after=fixed.after.as_dict(),
        der=fixed.der,
        selection=fixed.selection,
        lr_probe=fixed.lr_probe,
        retrain_seconds=round(fixed.retrain_seconds, 2),
        repaired_model=written.name,
        repaired_sha256=file_sha256(written),
    )


def _pct(v: float | None) -> str:
    return "unknown (no trigger= and no model card)" if v is None else f"{v:.2%}"


def _print_repair(metrics: dict, run_dir: RunDir) -> None:
    before, after = metrics["before"], metrics["after"]
    if after is None:
        rows = [
            ("verdict", "no backdoor found: nothing to repair"),
            ("clean accuracy", f"{before['clean_accuracy']:.2%}"),
            ("ASR of the real trigger", _pct(before["asr"])),
        ]
        if before.get("robust_accuracy") is not None:
            rows.append(("R-Acc of the real trigger", _pct(before["robust_accuracy"])))
        print_table(rows)
    else:
        repaired = ", ".join(map(str, metrics["targets"])) if metrics["targets"] else "none: plain fine-tuning, no triggers"
        rows = [
            ("repaired classes", repaired),
            ("clean accuracy", f"{before['clean_accuracy']:.2%} -> {after['clean_accuracy']:.2%}"),
            ("ASR of the real trigger", f"{_pct(before['asr'])} -> {_pct(after['asr'])}"),
        ]
        if before.get("robust_accuracy") is not None:  # BackdoorBench's R-Acc and DER: known with the real trigger
            rows.append(("R-Acc of the real trigger", f"{_pct(before['robust_accuracy'])} -> {_pct(after['robust_accuracy'])}"))
        if metrics.get("der") is not None:
            rows.append(("DER (BackdoorBench; 0.5 = no change)", f"{metrics['der']:.3f}"))
        rows += [
            (f"ASR of the found triggers, class {k}", f"{before['found_asr_by_class'][k]:.2%} -> {v:.2%}")
            for k, v in after["found_asr_by_class"].items()
        ]
        probe = metrics.get("lr_probe")
        if probe is not None and probe["trials"][0]["lr"] != probe["lr"]:  # say so when the model could not take defense.lr
            first = probe["trials"][0]
            rows.append(("retraining rate", f"{probe['lr']:g} (defense.lr={first['lr']:g} took clean accuracy "
                         f"{probe['accuracy_before']:.2%} -> {first['accuracy']:.2%} in a probe)"))  # fmt: skip
        rows += [
            ("seconds (search, retrain)", f"{metrics['search']['search_seconds']:.1f}, {metrics['retrain_seconds']:.1f}"),
            ("repaired model", run_dir.join(metrics["repaired_model"])),
        ]
        print_table(rows)
    print(f"wrote {run_dir.location}")
