"""`gdm-ray scan`: is this model backdoored, and to which class(es)?"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from gdm_ray.cli.commands import load_data, model_file, plain, progress_bar, setup, store_of, typed
from gdm_ray.core.class_search import ClassSearch, search_class
from gdm_ray.core.first_pass import ScanConfig, ScanResult, anomaly_index, plan_scan, reference_anomaly, rescore, scan_chunks, scan_result
from gdm_ray.core.ensemble import save_ensemble
from gdm_ray.core.errors import ConfigError, GdmRayError
from gdm_ray.core.mesa import MESA, MESAConfig
from gdm_ray.core.model_io import LoadedModel, load_model
from gdm_ray.core.plots import save_curves, save_heatmap, save_level_grid
from gdm_ray.store import CLASS_SCHEMA, VERDICT_SCHEMA, RunDir, code_version, config_hash, read_rows, write_json
from gdm_ray.store.fetch import localize
from gdm_ray.store.scanstate import ScanState

__all__ = ["scan", "scan_model", "first_pass", "full_search", "search_base", "reference_sizes"]

# the first-pass settings that decide a trigger's size: sizes found with
# other settings are not comparable
_SIZE_KEYS = ("method", "steps", "batch_size", "lr", "init_cost", "cost_step", "patience", "asr_goal")


def _class_grid(path: Path, result: ScanResult, names: list[str], title: str) -> None:
    """Each class's smallest trigger over grey, 10 classes a row, flagged ones marked."""
    rows, labels, titles = [], [], []
    for start in range(0, len(result.classes), 10):
        part = result.classes[start : start + 10]
        rows.append((torch.stack([c.pattern for c in part]), torch.stack([c.mask for c in part])))
        labels.append(f"classes\n{part[0].target}-{part[-1].target}")
        titles.append([f"{'*' if c.target in result.flagged else ''}{c.target} {names[c.target][:9]}\n"
                       f"{c.size:.0f}px {result.anomaly[start + i]:+.1f}" for i, c in enumerate(part)])  # fmt: skip
    save_level_grid(path, rows, title, labels, titles)


def first_pass(cfg: DictConfig, loaded: LoadedModel, splits, g: torch.Generator, model_id: str,
               state: ScanState | None = None) -> ScanResult:  # fmt: skip
    """The cheap pass over every class: each one's smallest trigger and the
    within-model anomaly index. With ``state``, each finished chunk of classes
    is kept there and a chunk already there is loaded, not searched again."""
    scfg = typed(ScanConfig, cfg.scan, "scan")
    data = splits.defense
    t0 = time.perf_counter()
    plan = plan_scan(data, scfg, g)
    found: list = []
    for i in range(plan.passes):
        key = ScanState.key(model_id, loaded.sha256, scfg, plan, i)
        cached = state.load(key) if state is not None else None
        if cached is not None:
            found += cached
            continue
        what = f"scan {model_id}: {data.num_classes} classes" + (f", chunk {i + 1}/{plan.passes}" if plan.passes > 1 else "")
        update, close = progress_bar(cfg, what)
        try:
            part = scan_chunks(loaded.module, data, scfg, plan, [i], progress=update)
        finally:
            close()
        if state is not None:
            state.save(key, part)
        found += part
    return scan_result(plan, scfg, found, time.perf_counter() - t0)


def search_base(g: torch.Generator) -> int:
    """The seed base of a model's full searches (class k: base + k)."""
    return int(torch.randint(0, 2**62, (1,), generator=g))


def full_search(cfg: DictConfig, model: torch.nn.Module, splits, k: int, seed: int, window: bool, full: bool,
                progress: bool = True) -> ClassSearch:  # fmt: skip
    """``search_class`` with the command's settings (scan, mesa, seed)."""
    scfg = typed(ScanConfig, cfg.scan, "scan")
    mcfg = typed(MESAConfig, cfg.mesa, "mesa") if full else None
    bar = (lambda desc: progress_bar(cfg, desc)) if progress else None  # a task on a cluster has no terminal
    return search_class(model, splits.defense, splits.eval, k, scfg, mcfg, seed, window, int(cfg.seed), bar)


def reference_sizes(folder: Path, names: list[str], scfg: ScanConfig, exclude_sha256: str | None) -> list[list[float]]:
    """Each model's per-class trigger sizes from a finished zoo-scan (its
    classes.parquet), to judge a model's classes against the same classes in
    other models: a natural trigger is then not an anomaly. The scanned model
    itself (same sha256) is left out; models without a full set of rows (a
    load error) are skipped."""
    table = folder / "classes.parquet"
    if not table.is_file():
        raise ConfigError(f"reference={folder}: no classes.parquet (give the output folder of a zoo-scan)")
    meta = folder / "zoo.json"
    if meta.is_file():
        used = json.loads(meta.read_text()).get("scan", {})
        mine = dataclasses.asdict(scfg)
        differ = [k for k in _SIZE_KEYS if k in used and used[k] != mine[k]]
        if differ:
            raise ConfigError(f"reference={folder}: scanned with other first-pass settings ("
                              + ", ".join(f"scan.{k}={used[k]} there, {mine[k]} here" for k in differ) + ")")  # fmt: skip
    skip: set[str] = set()
    if exclude_sha256 and (folder / "verdicts.parquet").is_file():
        skip = {r["model_id"] for r in read_rows(folder / "verdicts.parquet") if r.get("model_sha256") == exclude_sha256}
    by_model: dict[str, dict[int, float]] = {}
    for r in read_rows(table):
        if r["model_id"] in skip:
            continue
        if not 0 <= int(r["class"]) < len(names) or r["class_name"] != names[int(r["class"])]:
            raise ConfigError(f"reference={folder}: model {r['model_id']} class {r['class']} ({r['class_name']!r}) "
                              f"is not a class of this data set")  # fmt: skip
        by_model.setdefault(r["model_id"], {})[int(r["class"])] = float(r["trigger_size"])
    sizes = [[row[k] for k in range(len(names))] for row in by_model.values() if len(row) == len(names)]
    if len(sizes) < 2:
        raise ConfigError(f"reference={folder}: {len(sizes)} other scanned model(s); a reference needs at least 2")
    return sizes


def scan_model(
    cfg: DictConfig,
    loaded: LoadedModel,
    splits,
    run_dir: RunDir,
    g: torch.Generator,
    model_id: str,
    prefix: str = "",
    result: ScanResult | None = None,
    reference: str = "model",
    searches: dict[int, ClassSearch] | None = None,
    state: ScanState | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[int, MESA]]:
    """First pass over every class (unless ``result`` brings one, e.g.
    rescored against a zoo: ``reference="zoo"``; with ``reference=DIR`` in the
    config, a finished zoo-scan, the pass is judged against that zoo's
    models), then the full search of each
    flagged one. Returns the verdict row, the per-class rows (DESIGN.md
    section 3) and the fitted MESA of each flagged class (with full_search).
    Files go under ``prefix`` in the run folder. ``scan.method=baseline`` is
    the first pass alone (plain Neural Cleanse, no moving window, no MESA).
    ``searches`` brings the flagged classes' full searches when they ran
    elsewhere (gdm_ray.distributed: as Ray tasks); they are run here otherwise.
    ``state`` keeps (and resumes from) the first pass's finished chunks."""
    scfg = typed(ScanConfig, cfg.scan, "scan")
    baseline_only = scfg.method == "baseline"
    data = splits.defense
    names = data.classes
    t0 = time.perf_counter()
    given = result is not None  # its first pass ran earlier: count its seconds too
    ref = None if given or not cfg.get("reference") else localize(str(cfg.reference), store_of(cfg), "reference")
    others = reference_sizes(ref, names, scfg, loaded.sha256) if ref is not None else None  # fails before the search
    if result is None:
        result = first_pass(cfg, loaded, splits, g, model_id, state)
        within = result.anomaly
        if others is not None:  # judged against the same classes in the reference models
            result = rescore(result, reference_anomaly([[c.size for c in result.classes], *others])[0])
            reference = "zoo"
    else:
        within = anomaly_index([c.size for c in result.classes])
    _class_grid(run_dir.path(f"{prefix}classes.png"), result, names, f"{model_id}: smallest trigger per class (* flagged)")
    extra: dict[int, dict[str, Any]] = {}
    samplers: dict[int, MESA] = {}
    full = bool(cfg.get("full_search", True)) and not baseline_only  # defend always models the flagged classes
    window = bool(scfg.moving_window) and not baseline_only
    base = search_base(g)  # class k searches with base + k: any order, any process
    if searches is None:
        searches = {}
        for k in result.flagged if (full or window) else []:
            searches[k] = full_search(cfg, loaded.module, splits, k, base + k, window, full, cfg.get("progress", True))
    for k in result.flagged:
        info: dict[str, Any] = {}
        found = searches.get(k)
        heat = found.heat if found is not None else None
        if heat is not None:
            best = max(range(len(heat.windows)), key=lambda j: heat.strength[j])
            save_heatmap(run_dir.path(f"{prefix}class-{k}/heat.png"), heat.heat, data.x[0], heat.box,
                         (heat.patterns[best], heat.masks[best]), f"{model_id}: where class {k}'s trigger lives")  # fmt: skip
            info.update(heat_peak=list(heat.peak), heat_box=list(heat.box), heat_max=float(heat.heat.max()))
        if found is not None and found.mesa is not None:
            mesa, res = found.mesa, found.result
            samplers[k] = mesa
            save_ensemble(mesa, res, run_dir.path(f"{prefix}class-{k}/ensemble"), loaded.sha256,
                          {"source_model": loaded.path, "code_version": code_version()})  # fmt: skip
            n = int(cfg.samples_per_level)
            gk = torch.Generator().manual_seed(base + k)
            per_level = [mesa.sample(n, generator=gk, level=i) for i in range(res.generators.levels)]
            save_level_grid(run_dir.path(f"{prefix}class-{k}/samples.png"), per_level,
                            f"{model_id}: MESA triggers for class {k}",
                            [f"L{i} b={b:.2f}\nASR {a:.0%}" for i, (b, a) in enumerate(zip(res.betas, res.asr))])  # fmt: skip
            save_curves(run_dir.path(f"{prefix}class-{k}/curves.png"), res.history, f"{model_id}: MESA training, class {k}")
            info.update(mesa_level_asr=res.asr, mesa_weights=res.weights, mesa_asr_eval=found.asr_eval)
        extra[k] = info
    provenance = {"config_hash": config_hash(plain(cfg)), "code_version": code_version()}
    classes = [
        {"model_id": model_id, "class": c.target, "class_name": names[c.target], "trigger_size": c.size,
         "trigger_asr": c.asr, "valid": c.valid, "anomaly": result.anomaly[i], "anomaly_in_model": within[i],
         "flagged": c.target in result.flagged,
         **provenance}
        for i, c in enumerate(result.classes)
    ]  # fmt: skip
    verdict = {
        "model_id": model_id, "model_path": loaded.path, "model_sha256": loaded.sha256, "error": None,
        "backdoored": result.backdoored, "score": result.score,
        "target_class": result.flagged[0] if result.flagged else None, "flagged": list(result.flagged),
        "method": scfg.method, "reference": reference,
        "seconds": time.perf_counter() - t0 + (result.seconds if given else 0.0), **provenance,
    }  # fmt: skip
    write_json(run_dir.path(f"{prefix}scan.json"), {**verdict, "classes": classes, "flagged_detail": {str(k): v for k, v in extra.items()},
                                           "scan": dataclasses.asdict(scfg), "reference_path": None if ref is None else str(ref),
                                           "reference_models": 0 if others is None else len(others),
                                           "resumed_chunks": state.resumed if state is not None else 0})  # fmt: skip
    return verdict, classes, samplers


def ray_scan(cfg: DictConfig, loaded: LoadedModel, splits, g: torch.Generator, model_id: str,
             state: ScanState | None) -> tuple[ScanResult, dict[int, ClassSearch], dict[str, Any]]:  # fmt: skip
    """The first pass's chunks of classes, then each flagged class's full search (window chunks,
    MESA), as Ray tasks (in-process Ray unless ray.address), with the seeds the in-process scan
    draws from ``g``: scan_model then gives the same verdict as without Ray. Returns the first
    pass, the searches and the task log's summary."""
    import ray

    from gdm_ray.distributed.runtime import RayConfig, init_ray
    from gdm_ray.distributed.scan import TaskLog, put_model, run_class_searches, run_first_passes

    scfg = typed(ScanConfig, cfg.scan, "scan")
    rcfg = typed(RayConfig, cfg.ray, "ray")
    full = bool(cfg.get("full_search", True)) and scfg.method != "baseline"
    window = bool(scfg.moving_window) and scfg.method != "baseline"
    mcfg = typed(MESAConfig, cfg.mesa, "mesa") if full else None
    progress = bool(cfg.get("progress", True))
    arch = cfg.arch.name if cfg.get("arch") else None
    log = TaskLog()
    started = init_ray(rcfg)
    try:
        ref = put_model(model_id, Path(loaded.path), loaded.sha256, arch, splits.shape, splits.eval.num_classes)
        plan = plan_scan(splits.defense, scfg, g)  # draws from g as first_pass does
        found, errors = run_first_passes(rcfg, [ref], splits.defense, scfg, plan, state or ScanState(None), log, progress)
        if errors:
            raise GdmRayError(f"scan {model_id}: first pass failed on Ray: {errors[model_id]}")
        result = scan_result(plan, scfg, found[model_id], log.seconds.get(model_id, 0.0))
        searches: dict[int, ClassSearch] = {}
        if result.flagged and (full or window):
            probe = torch.Generator()
            probe.set_state(g.get_state())
            base = search_base(probe)  # what scan_model will draw from g next
            asks = [(ref, k, base + k) for k in result.flagged]
            done, errors = run_class_searches(rcfg, asks, splits.defense, splits.eval, scfg, mcfg, window, int(cfg.seed), log, progress)
            if errors:
                raise GdmRayError(f"scan {model_id}: full search failed on Ray: {errors[model_id]}")
            searches = {k: v for (_, k), v in done.items()}
    finally:
        if started:
            ray.shutdown()
    return result, searches, log.summary()


def scan(cfg: DictConfig) -> dict[str, Any]:
    """Scan every class of one model; print the verdict table."""
    device = setup(cfg)
    model_path = model_file(cfg)
    scfg = typed(ScanConfig, cfg.scan, "scan")  # bad settings fail before the data loads
    splits = load_data(cfg)
    _, H, W = splits.shape
    if scfg.moving_window and scfg.window and (len(scfg.window) != 2 or scfg.window[0] > H or scfg.window[1] > W):
        raise ConfigError(f"scan.window={'x'.join(map(str, scfg.window))} does not fit the image {H}x{W}")
    if cfg.get("use_ray", False) and cfg.get("reference"):
        raise ConfigError(f"use_ray=true with reference={cfg.reference}: judging against a zoo runs in one process; "
                          "drop use_ray (or zoo-scan the model with the zoo)")  # fmt: skip
    arch = cfg.arch.name if cfg.get("arch") else None
    loaded = load_model(model_path, splits.shape, splits.eval.num_classes, arch=arch, device=device)
    g = torch.Generator().manual_seed(int(cfg.seed))
    print(f"gdm-ray scan: {loaded.path}, {splits.eval.num_classes} classes, {len(splits.defense)} clean images", file=sys.stderr)
    t0 = time.perf_counter()
    with RunDir(cfg.get("out"), "scan", store_of(cfg), cfg.get("dataset")) as run_dir:
        # with an explicit out=, finished chunks of the first pass wait beside it: run again, it resumes
        state = ScanState(run_dir.state_dir()) if cfg.get("out") else None
        if cfg.get("use_ray", False):
            result, searches, tasks = ray_scan(cfg, loaded, splits, g, model_path.stem, state)
            verdict, classes, _ = scan_model(cfg, loaded, splits, run_dir, g, model_path.stem, result=result, searches=searches,
                                             state=state)  # fmt: skip
            print(f"Ray: {tasks['tasks_run']} tasks run, {tasks['tasks_resumed']} resumed, on {len(tasks['nodes'])} node(s)",
                  file=sys.stderr)  # fmt: skip
        else:
            verdict, classes, _ = scan_model(cfg, loaded, splits, run_dir, g, model_path.stem, state=state)
        run_dir.write_table("verdict.parquet", [verdict], VERDICT_SCHEMA, "verdicts")
        run_dir.write_table("classes.parquet", classes, CLASS_SCHEMA, "classes")
    if state is not None:
        state.clear()
    width = max(len(c["class_name"]) for c in classes)
    print(f"  {'class'.ljust(width + 4)}  trigger px  ASR      anomaly  flagged")
    for c in sorted(classes, key=lambda c: -c["anomaly"]):
        print(f"  {c['class']:>2}  {c['class_name'].ljust(width)}  {c['trigger_size']:>10.1f}  {c['trigger_asr']:>6.1%}  "
              f"{c['anomaly']:>7.2f}  {'YES' if c['flagged'] else ''}")  # fmt: skip
    target = verdict["target_class"]
    print(f"verdict: {'BACKDOORED' if verdict['backdoored'] else 'clean'} (score {verdict['score']:.2f}"
          + (f", target class {target}, flagged {verdict['flagged']}" if verdict["backdoored"] else "")
          + f"; {time.perf_counter() - t0:.0f}s)")  # fmt: skip
    print(f"wrote {run_dir.location}")
    return {**verdict, "out": run_dir.location}
