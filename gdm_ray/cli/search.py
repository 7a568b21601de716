"""`gdm-ray search` and `gdm-ray defend`: the trigger search and the repair.

Both run the core workflow (gdm_ray.core.repair); this module loads the
model and data from the typed settings, writes the files and prints."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from gdm_ray.cli.common import card_for, load_data, model_file, print_table, progress_bar, setup
from gdm_ray.cli.settings import DefendSettings, SearchSettings, build, plain
from gdm_ray.core.baseline import save_trigger
from gdm_ray.core.data import Splits
from gdm_ray.core.ensemble import save_ensemble
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.metrics import EVAL_SEED_OFFSET, sampled_asr
from gdm_ray.core.model_io import LoadedModel, file_sha256, load_model, save_torchscript
from gdm_ray.core.plots import save_curves, save_level_grid, save_pca_scatter
from gdm_ray.core.repair import ProgressFactory, RepairResult, SearchResult, SearchSpec, repair, search_triggers
from gdm_ray.core.triggers import Trigger, TriggerSpec, make_trigger
from gdm_ray.store import REPAIR_SCHEMA, RunDir, code_version, config_hash, write_json
from gdm_ray.store.repair_rows import repair_row
from gdm_ray.store.scanstate import ScanState

__all__ = ["search", "defend", "load_for_search", "real_trigger"]

PCA_SAMPLES = 200  # samples per level drawn for pca.png (samples.png shows the first samples_per_level)


def load_for_search(s: Any, device: torch.device) -> tuple[LoadedModel, Splits, int | None]:
    """The model and data of search/defend/sweep settings (``model``, ``store``,
    ``data``, ``arch``, ``target_class``): (model, splits, target or None for auto).
    A missing model file fails before the slow data load."""
    path = model_file(s.model, s.store)
    splits = load_data(s.data)
    loaded = load_model(path, splits.shape, splits.eval.num_classes, arch=s.arch.name if s.arch else None, device=device)
    if s.target_class == "auto":
        return loaded, splits, None
    if not 0 <= int(s.target_class) < loaded.num_classes:
        raise ConfigError(f"target_class={s.target_class} is not a class of the model (0..{loaded.num_classes - 1})")
    return loaded, splits, int(s.target_class)


def _bars(s: SearchSettings) -> ProgressFactory:
    return lambda desc: progress_bar(s.progress, desc)


def _spec(s: SearchSettings, target: int) -> SearchSpec:
    """The search the settings ask for; MESA's per-level samples are drawn for the pictures."""
    config = s.mesa if s.method == "mesa" else s.baseline
    return SearchSpec(s.method, target, config, max(int(s.samples_per_level), PCA_SAMPLES))


def _write_search(run_dir: RunDir, found: SearchResult, loaded: LoadedModel, k: int) -> None:
    """The search's artifact (ensemble or trigger file) and pictures."""
    name, target, sampler = Path(loaded.path).name, found.target, found.sampler
    if found.method == "mesa":
        result = found.result
        save_ensemble(sampler, result, run_dir.path("ensemble"), loaded.sha256,  # type: ignore[arg-type]
                      {"source_model": loaded.path, "code_version": code_version()})  # fmt: skip
        labels = [f"L{i} b={b:.2f}\nASR {a:.0%}" for i, (b, a) in enumerate(zip(result.betas, result.asr))]
        save_level_grid(run_dir.path("samples.png"), [(p[:k], a[:k]) for p, a in found.previews],
                        f"{name}: MESA triggers for class {target}, one row per level", labels)  # fmt: skip
        with_alpha = sampler.config.with_alpha  # type: ignore[attr-defined]
        flat = [torch.cat([p.flatten(1), a.flatten(1)], 1) if with_alpha else p for p, a in found.previews]
        save_pca_scatter(run_dir.path("pca.png"), flat, f"{name}: samples by level (PCA)")
        save_curves(run_dir.path("curves.png"), result.history, f"{name}: MESA training, class {target}")
    else:
        bres = found.result
        save_level_grid(run_dir.path("samples.png"), [(bres.pattern[None], bres.alpha[None])],
                        f"{name}: baseline trigger for class {target}", [f"ASR {bres.asr:.0%}"])  # fmt: skip
        save_trigger(bres, run_dir.path("trigger.safetensors"))  # type: ignore[arg-type]


def search(s: SearchSettings) -> dict[str, Any]:
    """Search the valid triggers of target_class and write them out."""
    device = setup(s)
    loaded, splits, target = load_for_search(s, device)
    assert target is not None  # SearchSettings takes no auto
    rng = torch.Generator().manual_seed(s.seed)
    print(f"gdm-ray search: {loaded.path}, class {target}, {s.method} on {len(splits.defense)} clean images", file=sys.stderr)
    with RunDir(s.out, "search", s.store) as run_dir:
        spec = _spec(s, target)
        found = search_triggers(s.method, loaded.module, splits.defense, target, spec.config, rng, _bars(s), spec.preview_samples)
        _write_search(run_dir, found, loaded, s.samples_per_level)
        summary = found.summary()
        # after the pictures' draws, from the same generator (as search.json always measured it)
        summary["found_asr_eval"] = sampled_asr(loaded.module, splits.eval, found.sampler, target, rng)
        summary.update({"model": loaded.path, "model_sha256": loaded.sha256, "config_hash": config_hash(plain(s)),
                        "code_version": code_version()})  # fmt: skip
        write_json(run_dir.path("search.json"), summary)
    rows = [("method", s.method), ("found triggers' ASR (eval)", f"{summary['found_asr_eval']:.2%}"),
            ("search seconds", f"{summary['search_seconds']:.1f}")]  # fmt: skip
    if s.method == "mesa":
        rows.insert(1, ("level ASR", ", ".join(f"{a:.0%}" for a in summary["level_asr"])))
    print_table(rows)
    print(f"wrote {run_dir.location}")
    return {**summary, "out": run_dir.location}


def real_trigger(trigger: TriggerSpec | None, target_class: Any, model_path: Path,
                 shape: tuple[int, int, int]) -> tuple[Trigger | None, int | None, dict | None]:  # fmt: skip
    """The trigger the model was actually poisoned with, when known (trigger= or
    the model card): (trigger, its target, its TriggerSpec fields)."""
    card = card_for(model_path)
    card_target = card.get("target_class", card.get("target"))  # cards before target_class name it target
    if trigger is not None:
        spec = trigger
        if target_class == "auto" and card_target is None:
            raise ConfigError("trigger=... with target_class=auto: the model has no card naming its real target")
        target = int(card_target if target_class == "auto" else target_class)
    elif card.get("trigger"):
        spec = build(TriggerSpec, card["trigger"], "model card trigger")
        if card_target is None:
            raise ConfigError(f"model card {model_path.with_suffix('.json')} has a trigger but no target_class")
        target = int(card_target)
    else:
        return None, None, None
    c, h, w = shape
    return make_trigger(spec, c, (h, w)), target, dataclasses.asdict(spec)


def _scan_for_defend(s: DefendSettings, loaded: LoadedModel, splits: Splits, run_dir: RunDir, rng: torch.Generator,
                     state: ScanState | None) -> tuple[dict[str, Any], dict[int, Any]]:  # fmt: skip
    """TRANSITIONAL ADAPTER (issue 18): target_class=auto scans through cli/scan's
    ``scan_model`` shim (being rewritten on typed settings in wt-scan) until that
    module offers its scan workflow function; then call it here directly.
    Returns the verdict row and the fitted MESA of each flagged class."""
    from gdm_ray.cli.scan import scan_model

    verdict, _, samplers = scan_model(s, loaded, splits, run_dir, rng, Path(loaded.path).stem, state=state)
    return verdict, samplers


def _repair(s: DefendSettings, loaded: LoadedModel, splits: Splits, target: int | None, run_dir: RunDir,
            real: tuple[Trigger | None, int | None], state: ScanState | None) -> tuple[RepairResult, dict[str, Any]]:  # fmt: skip
    """Scan (auto) or search, then the core repair; writes the search's files. (result, search summary)."""
    rng = torch.Generator().manual_seed(s.seed)  # the search's (or scan's), then the retraining's
    common = dict(real_trigger=real[0], real_target=real[1], progress=_bars(s))
    args = (loaded.module, splits.defense, splits.eval, s.defense, rng, s.seed + EVAL_SEED_OFFSET)
    if target is None:
        verdict, samplers = _scan_for_defend(s, loaded, splits, run_dir, rng, state)
        res = repair(*args, samplers=samplers, search_seconds=verdict["seconds"], **common)  # type: ignore[arg-type]
        return res, {"method": "mesa", "scan": verdict, "search_seconds": round(verdict["seconds"], 2)}
    res = repair(*args, search=_spec(s, target), **common)  # type: ignore[arg-type]
    assert res.search is not None
    _write_search(run_dir, res.search, loaded, s.samples_per_level)
    return res, res.search.summary()


def _metrics(s: DefendSettings, loaded: LoadedModel, splits: Splits, res: RepairResult, summary: dict[str, Any],
             real_spec: dict | None, real_target: int | None) -> dict[str, Any]:  # fmt: skip
    """metrics.json (repaired_sha256 is set once the model is written)."""
    return {
        "model": loaded.path, "model_sha256": loaded.sha256, "method": s.method, "target_class": s.target_class,
        "targets": res.targets, "real_trigger": real_spec, "real_target": real_target, "before": res.before.as_dict(),
        "search": summary, "defense": dataclasses.asdict(s.defense), "eval_images": len(splits.eval),
        "config_hash": config_hash(plain(s)), "code_version": code_version(),
        "retrain_seconds": round(res.retrain_seconds, 2), "after": None if res.after is None else res.after.as_dict(),
        "repaired_sha256": None,
    }  # fmt: skip


def defend(s: DefendSettings) -> dict[str, Any]:
    """Search (or, with target_class=auto, scan every class), then retrain
    against the found triggers of every target at once; write the repaired
    model and metrics."""
    device = setup(s)
    loaded, splits, target = load_for_search(s, device)
    real, real_target, real_spec = real_trigger(s.trigger, s.target_class, Path(loaded.path), splits.shape)
    what = "every class (target_class=auto)" if target is None else f"class {target}"
    print(f"gdm-ray defend: {loaded.path}, {what}, {s.method}; search and retrain on {len(splits.defense)} "
          f"clean images, metrics on {len(splits.eval)} held-out images", file=sys.stderr)  # fmt: skip
    state: ScanState | None = None
    with RunDir(s.out, "defend", s.store, s.dataset) as run_dir:
        if target is None and s.out:
            state = ScanState(run_dir.state_dir())  # resumes the first pass
        res, summary = _repair(s, loaded, splits, target, run_dir, (real, real_target), state)
        metrics = _metrics(s, loaded, splits, res, summary, real_spec, real_target)
        if res.repaired is not None:  # a scan that found no backdoor writes no model
            save_torchscript(res.repaired, run_dir.path("model.pt"), splits.shape,
                             {"repaired_from": loaded.sha256, "method": s.method, "target_classes": res.targets})  # fmt: skip
            metrics["repaired_sha256"] = file_sha256(run_dir.path("model.pt"))
        run_dir.write_table("repair.parquet", [repair_row(metrics, Path(loaded.path).stem, run_dir.join("model.pt"))],
                            REPAIR_SCHEMA, "repairs")  # fmt: skip
        write_json(run_dir.path("metrics.json"), metrics)
    if state is not None:
        state.clear()  # published: nothing left to resume
    _print_repair(metrics, run_dir.join("model.pt"))
    print(f"wrote {run_dir.location}")
    return {**metrics, "out": run_dir.location}


def _pct(v: float | None) -> str:
    return "unknown (no trigger= and no model card)" if v is None else f"{v:.2%}"


def _print_repair(metrics: dict[str, Any], model_uri: str) -> None:
    before, after = metrics["before"], metrics["after"]
    if after is None:
        print_table([("verdict", "no backdoor found: nothing to repair"),
                     ("clean accuracy", f"{before['clean_accuracy']:.2%}"), ("ASR of the real trigger", _pct(before["asr"]))])  # fmt: skip
        return
    rows = [
        ("repaired classes", ", ".join(map(str, metrics["targets"]))),
        ("clean accuracy", f"{before['clean_accuracy']:.2%} -> {after['clean_accuracy']:.2%}"),
        ("ASR of the real trigger", f"{_pct(before['asr'])} -> {_pct(after['asr'])}"),
    ]
    rows += [(f"ASR of the found triggers, class {k}", f"{before['found_asr_by_class'][k]:.2%} -> {v:.2%}")
             for k, v in after["found_asr_by_class"].items()]  # fmt: skip
    rows += [("seconds (search, retrain)", f"{metrics['search']['search_seconds']:.1f}, {metrics['retrain_seconds']:.1f}"),
             ("repaired model", model_uri)]  # fmt: skip
    print_table(rows)
