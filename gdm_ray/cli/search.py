"""`gdm-ray search` and `gdm-ray defend`: the trigger search and the repair."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from gdm_ray.cli.commands import card_for, load_data, model_file, plain, print_table, progress_bar, setup, store_of, typed
from gdm_ray.core.baseline import BaselineConfig, PixelBaseline, save_trigger
from gdm_ray.core.data import Splits
from gdm_ray.core.defense import DefenseConfig, TriggerSampler, retrain
from gdm_ray.core.ensemble import save_ensemble
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.mesa import MESA, MESAConfig
from gdm_ray.core.metrics import EVAL_SEED_OFFSET, attack_success_rate, clean_accuracy, sampled_asr
from gdm_ray.core.model_io import LoadedModel, clone_model, file_sha256, load_model, save_torchscript
from gdm_ray.core.plots import save_curves, save_level_grid, save_pca_scatter
from gdm_ray.core.triggers import Trigger, TriggerSpec, make_trigger
from gdm_ray.store import REPAIR_SCHEMA, RunDir, code_version, config_hash, write_json
from gdm_ray.store.scanstate import ScanState

__all__ = ["search", "defend", "run_search"]

METHODS = ("mesa", "baseline")


def _load(cfg: DictConfig, device: torch.device, allow_auto: bool = False) -> tuple[LoadedModel, Splits, int | None, str]:
    model_path = model_file(cfg)
    method = str(cfg.method)
    if method not in METHODS:
        raise ConfigError(f"method={method!r} must be one of {', '.join(METHODS)}")
    target = cfg.target_class
    auto = allow_auto and target == "auto"
    if not auto and (isinstance(target, bool) or not isinstance(target, int)):
        raise ConfigError(f"target_class={target!r} must be a class index" + (" or auto" if allow_auto else ""))
    if auto and method != "mesa":
        raise ConfigError(f"target_class=auto scans with MESA; method={method} needs a class index")
    splits = load_data(cfg)
    arch = cfg.arch.name if cfg.get("arch") else None
    loaded = load_model(model_path, splits.shape, splits.eval.num_classes, arch=arch, device=device)
    if auto:
        return loaded, splits, None, method
    if not 0 <= target < loaded.num_classes:
        raise ConfigError(f"target_class={target} is not a class of the model (0..{loaded.num_classes - 1})")
    return loaded, splits, int(target), method


def run_search(
    cfg: DictConfig, method: str, loaded: LoadedModel, splits: Splits, target: int, run_dir: RunDir, g: torch.Generator
) -> tuple[TriggerSampler, dict[str, Any]]:
    """Run MESA or the baseline on the defense split; write its artifact and
    pictures into run_dir; return the sampler and a summary."""
    update, close = progress_bar(cfg, f"{method} search")
    t0 = time.perf_counter()
    name = Path(loaded.path).name
    try:
        if method == "mesa":
            mesa = MESA(typed(MESAConfig, cfg.mesa, "mesa"))
            result = mesa.fit(loaded.module, splits.defense, target, g, update)
        else:
            base = PixelBaseline(typed(BaselineConfig, cfg.baseline, "baseline"))
            bres = base.fit(loaded.module, splits.defense, target, g, update)
    finally:
        close()
    seconds = time.perf_counter() - t0
    k = int(cfg.samples_per_level)
    if method == "mesa":
        save_ensemble(mesa, result, run_dir.path("ensemble"), loaded.sha256,
                      {"source_model": loaded.path, "code_version": code_version()})  # fmt: skip
        per_level = [mesa.sample(max(k, 200), generator=g, level=i) for i in range(result.generators.levels)]
        labels = [f"L{i} b={b:.2f}\nASR {a:.0%}" for i, (b, a) in enumerate(zip(result.betas, result.asr))]
        save_level_grid(run_dir.path("samples.png"), [(p[:k], a[:k]) for p, a in per_level],
                        f"{name}: MESA triggers for class {target}, one row per level", labels)  # fmt: skip
        flat = [torch.cat([p.flatten(1), a.flatten(1)], 1) if mesa.config.with_alpha else p for p, a in per_level]
        save_pca_scatter(run_dir.path("pca.png"), flat, f"{name}: samples by level (PCA)")
        save_curves(run_dir.path("curves.png"), result.history, f"{name}: MESA training, class {target}")
        summary = {
            "method": "mesa", "levels": result.generators.levels, "betas": result.betas, "alpha": result.alpha,
            "level_asr": result.asr, "entropy": result.entropy, "weights": result.weights, "steps": result.steps,
        }  # fmt: skip
        sampler: TriggerSampler = mesa
    else:
        save_level_grid(run_dir.path("samples.png"), [(bres.pattern[None], bres.alpha[None])],
                        f"{name}: baseline trigger for class {target}", [f"ASR {bres.asr:.0%}"])  # fmt: skip
        save_trigger(bres, run_dir.path("trigger.safetensors"))
        summary = {"method": "baseline", "found_asr_search": bres.asr, "restart_asr": bres.restart_asr}
        sampler = base
    summary.update({"search_seconds": round(seconds, 2), "target_class": target})
    return sampler, summary


def search(cfg: DictConfig) -> dict[str, Any]:
    """Search the valid triggers of target_class and write them out."""
    device = setup(cfg)
    loaded, splits, target, method = _load(cfg, device)
    g = torch.Generator().manual_seed(int(cfg.seed))
    print(f"gdm-ray search: {loaded.path}, class {target}, {method} on {len(splits.defense)} clean images", file=sys.stderr)
    with RunDir(cfg.get("out"), "search", store_of(cfg)) as run_dir:
        sampler, summary = run_search(cfg, method, loaded, splits, target, run_dir, g)
        summary["found_asr_eval"] = sampled_asr(loaded.module, splits.eval, sampler, target, g)
        summary.update({"model": loaded.path, "model_sha256": loaded.sha256, "config_hash": config_hash(plain(cfg)),
                        "code_version": code_version()})  # fmt: skip
        write_json(run_dir.path("search.json"), summary)
    rows = [("method", method), ("found triggers' ASR (eval)", f"{summary['found_asr_eval']:.2%}"),
            ("search seconds", f"{summary['search_seconds']:.1f}")]  # fmt: skip
    if method == "mesa":
        rows.insert(1, ("level ASR", ", ".join(f"{a:.0%}" for a in summary["level_asr"])))
    print_table(rows)
    print(f"wrote {run_dir.location}")
    return {**summary, "out": run_dir.location}


def _real_trigger(cfg: DictConfig, model_path: Path, splits: Splits) -> tuple[Trigger | None, int | None, dict | None]:
    """The trigger the model was actually poisoned with, when known (trigger= or the card)."""
    card = card_for(model_path)
    if cfg.get("trigger") is not None:
        spec = typed(TriggerSpec, cfg.trigger, "trigger")
        if cfg.target_class == "auto":
            if card.get("target") is None:
                raise ConfigError("trigger=... with target_class=auto: the model has no card naming its real target")
            target = int(card["target"])
        else:
            target = int(cfg.target_class)
    elif card.get("trigger"):
        spec = typed(TriggerSpec, card["trigger"], "model card trigger")
        target = int(card["target"])
    else:
        return None, None, None
    c, h, w = splits.shape
    return make_trigger(spec, c, (h, w)), target, dataclasses.asdict(spec)


def repair_row(metrics: dict[str, Any], model_id: str, model_uri: str) -> dict[str, Any]:
    """defend's metrics as one row of repair.parquet (gdm_ray.store.tables.REPAIR_SCHEMA)."""
    before, after = metrics["before"], metrics["after"] or {}
    return {
        "model_id": model_id,
        "model_path": metrics["model"], "model_sha256": metrics["model_sha256"], "method": metrics["method"],
        "target_class": str(metrics["target_class"]), "targets": [int(t) for t in metrics["targets"]],
        "asr_before": before["asr"], "asr_after": after.get("asr"),
        "acc_before": before["clean_accuracy"], "acc_after": after.get("clean_accuracy"),
        "found_asr_before": before["found_asr"], "found_asr_after": after.get("found_asr"),
        "search_seconds": float(metrics["search"]["search_seconds"]), "retrain_seconds": float(metrics["retrain_seconds"]),
        "repaired_model": model_uri if metrics["repaired_sha256"] else None, "repaired_sha256": metrics["repaired_sha256"],
        "config_hash": metrics["config_hash"], "code_version": metrics["code_version"],
    }  # fmt: skip


def defend(cfg: DictConfig) -> dict[str, Any]:
    """Search (or, with target_class=auto, scan every class), then retrain
    against the found triggers of every target at once; write the repaired
    model and metrics."""
    from gdm_ray.cli.scan import scan_model

    device = setup(cfg)
    loaded, splits, target, method = _load(cfg, device, allow_auto=True)
    defense_cfg = typed(DefenseConfig, cfg.defense, "defense")
    real, real_target, real_spec = _real_trigger(cfg, Path(loaded.path), splits)
    g = torch.Generator().manual_seed(int(cfg.seed))
    eval_seed = int(cfg.seed) + EVAL_SEED_OFFSET

    def found_asr(model: torch.nn.Module, samplers: dict[int, TriggerSampler]) -> dict[str, float]:
        return {str(k): sampled_asr(model, splits.eval, s, k, torch.Generator().manual_seed(eval_seed)) for k, s in samplers.items()}

    def measure(model: torch.nn.Module, samplers: dict[int, TriggerSampler]) -> dict[str, Any]:
        out: dict[str, Any] = {"clean_accuracy": clean_accuracy(model, splits.eval)}
        out["asr"] = (attack_success_rate(model, splits.eval, real, real_target, torch.Generator().manual_seed(eval_seed))
                      if real is not None else None)  # fmt: skip
        by_class = found_asr(model, samplers)
        out["found_asr_by_class"] = by_class
        out["found_asr"] = sum(by_class.values()) / len(by_class) if by_class else None
        return out

    what = "every class (target_class=auto)" if target is None else f"class {target}"
    print(f"gdm-ray defend: {loaded.path}, {what}, {method}; search and retrain on {len(splits.defense)} "
          f"clean images, metrics on {len(splits.eval)} held-out images", file=sys.stderr)  # fmt: skip
    state: ScanState | None = None
    with RunDir(cfg.get("out"), "defend", store_of(cfg), cfg.get("dataset")) as run_dir:
        if target is None:
            state = ScanState(run_dir.state_dir()) if cfg.get("out") else None  # resumes the first pass
            verdict, _, samplers = scan_model(cfg, loaded, splits, run_dir, g, Path(loaded.path).stem, state=state)
            summary: dict[str, Any] = {"method": "mesa", "scan": verdict, "search_seconds": round(verdict["seconds"], 2)}
        else:
            sampler, summary = run_search(cfg, method, loaded, splits, target, run_dir, g)
            samplers = {target: sampler}
        targets = list(samplers)
        before = measure(loaded.module, samplers)
        metrics: dict[str, Any] = {
            "model": loaded.path, "model_sha256": loaded.sha256, "method": method, "target_class": target if target is not None else "auto",
            "targets": targets, "real_trigger": real_spec, "real_target": real_target, "before": before, "search": summary,
            "defense": dataclasses.asdict(defense_cfg), "eval_images": len(splits.eval),
            "config_hash": config_hash(plain(cfg)), "code_version": code_version(),
        }  # fmt: skip
        if not targets:  # the scan found no backdoor: nothing to repair, no model written
            metrics.update(after=None, retrain_seconds=0.0, repaired_sha256=None)
        else:
            repaired = clone_model(loaded.module)
            update, close = progress_bar(cfg, "retrain")
            t0 = time.perf_counter()
            try:
                retrain(repaired, splits.defense, list(samplers.values()), defense_cfg, g, update)
            finally:
                close()
            metrics["retrain_seconds"] = round(time.perf_counter() - t0, 2)
            metrics["after"] = measure(repaired, samplers)
            save_torchscript(repaired, run_dir.path("model.pt"), splits.shape,
                             {"repaired_from": loaded.sha256, "method": method, "target_classes": targets})  # fmt: skip
            metrics["repaired_sha256"] = file_sha256(run_dir.path("model.pt"))
        run_dir.write_table("repair.parquet", [repair_row(metrics, Path(loaded.path).stem, run_dir.join("model.pt"))], REPAIR_SCHEMA, "repairs")
        write_json(run_dir.path("metrics.json"), metrics)
    if state is not None:
        state.clear()  # published: nothing left to resume

    def pct(v: float | None) -> str:
        return "unknown (no trigger= and no model card)" if v is None else f"{v:.2%}"

    after = metrics["after"]
    if after is None:
        print_table([("verdict", "no backdoor found: nothing to repair"),
                     ("clean accuracy", f"{before['clean_accuracy']:.2%}"), ("ASR of the real trigger", pct(before["asr"]))])  # fmt: skip
    else:
        rows = [
            ("repaired classes", ", ".join(map(str, targets))),
            ("clean accuracy", f"{before['clean_accuracy']:.2%} -> {after['clean_accuracy']:.2%}"),
            ("ASR of the real trigger", f"{pct(before['asr'])} -> {pct(after['asr'])}"),
        ]
        rows += [(f"ASR of the found triggers, class {k}", f"{before['found_asr_by_class'][k]:.2%} -> {v:.2%}")
                 for k, v in after["found_asr_by_class"].items()]  # fmt: skip
        rows += [("seconds (search, retrain)", f"{summary['search_seconds']:.1f}, {metrics['retrain_seconds']:.1f}"),
                 ("repaired model", run_dir.join("model.pt"))]  # fmt: skip
        print_table(rows)
    print(f"wrote {run_dir.location}")
    return {**metrics, "out": run_dir.location}
