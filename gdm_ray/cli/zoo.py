"""`gdm-ray zoo-scan`: scan every model file in a folder, one verdict row each."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from gdm_ray.cli.commands import load_data, plain, setup, store_of, typed
from gdm_ray.cli.scan import first_pass, scan_model, search_base
from gdm_ray.core.class_search import ClassSearch
from gdm_ray.core.first_pass import ScanConfig, ScanResult, plan_scan, reference_anomaly, rescore, scan_result
from gdm_ray.core.mesa import MESAConfig
from gdm_ray.core.errors import ConfigError, GdmRayError
from gdm_ray.core.model_io import file_sha256, load_model
from gdm_ray.core.plots import save_zoo_scores
from gdm_ray.distributed.runtime import RayConfig, init_ray
from gdm_ray.distributed.scan import TaskLog, put_model, run_class_searches, run_first_passes
from gdm_ray.store import CLASS_SCHEMA, VERDICT_SCHEMA, RunDir, code_version, config_hash, write_json
from gdm_ray.store.fetch import localize
from gdm_ray.store.scanstate import ScanState

__all__ = ["zoo_scan", "list_models"]

# TorchScript archives and arch + safetensors state dicts (DESIGN.md section 3, "Models")
MODEL_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".safetensors")
# fewer models than this cannot say what a class's trigger size usually is
MIN_ZOO = 3


def list_models(folder: Path, pattern: str = "*") -> list[Path]:
    """Model files directly in ``folder`` matching ``pattern``, sorted; ids (stems) must be unique."""
    if not folder.is_dir():
        raise ConfigError(f"zoo.path={folder}: no such folder")
    files = sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES)
    if not files:
        raise ConfigError(f"zoo.path={folder}: no model files matching {pattern!r} ({', '.join(MODEL_SUFFIXES)})")
    seen: dict[str, Path] = {}
    for p in files:
        if p.stem in seen:
            raise ConfigError(f"zoo.path={folder}: {seen[p.stem].name} and {p.name} share the model id {p.stem!r}")
        seen[p.stem] = p
    return files


def _failed_row(path: Path, error: str, provenance: dict[str, str], method: str) -> dict[str, Any]:
    try:
        sha = file_sha256(path)
    except OSError:
        sha = None
    return {"model_id": path.stem, "model_path": str(path), "model_sha256": sha, "error": error, "backdoored": None,
            "score": None, "target_class": None, "flagged": [], "method": method, "seconds": None, **provenance}  # fmt: skip


def zoo_scan(cfg: DictConfig) -> dict[str, Any]:
    """Scan each model in zoo.path; a model that fails to load or scan gets a
    row with its error and the scan goes on."""
    device = setup(cfg)
    folder = localize(str(cfg.zoo.path), store_of(cfg), "zoo.path")
    files = list_models(folder, str(cfg.zoo.get("glob") or "*"))
    scfg = typed(ScanConfig, cfg.scan, "scan")  # bad settings fail before any model is scanned
    rcfg = typed(RayConfig, cfg.ray, "ray")
    splits = load_data(cfg)
    arch = cfg.arch.name if cfg.get("arch") else None
    provenance = {"config_hash": config_hash(plain(cfg)), "code_version": code_version()}
    print(f"gdm-ray zoo-scan: {len(files)} models in {folder}, {splits.eval.num_classes} classes, "
          f"{len(splits.defense)} clean images, method {scfg.method}", file=sys.stderr)  # fmt: skip
    calibrate = bool(cfg.zoo.get("calibrate", True))
    t0 = time.perf_counter()
    failed: dict[str, dict[str, Any]] = {}

    def load(path: Path):
        # loaded again for the full search rather than held: a zoo of big models need not fit in memory
        return load_model(path, splits.shape, splits.eval.num_classes, arch=arch, device=device)

    def fail(path: Path, exc: BaseException) -> None:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        failed[path.stem] = _failed_row(path, msg, provenance, scfg.method)
        print(f"  {path.stem}: ERROR {msg}", file=sys.stderr, flush=True)

    by_id = {p.stem: p for p in files}
    progress = bool(cfg.get("progress", True))
    ray_log: TaskLog | None = TaskLog() if bool(cfg.get("use_ray", True)) else None
    started = init_ray(rcfg) if ray_log is not None else False
    try:
        with RunDir(cfg.get("out"), "zoo-scan", store_of(cfg), cfg.get("dataset")) as run_dir:
            # finished first-pass chunks, kept beside the output until it is published: a
            # zoo-scan run again with the same out= after an interruption resumes from them
            resume = ScanState(run_dir.state_dir() if cfg.get("out") else None)
            # 1. the cheap first pass over every model; each starts from the same
            #    seed, so its verdict does not depend on its neighbours in the folder
            passes: dict[str, ScanResult] = {}
            if ray_log is not None:
                refs = {}
                for path in files:
                    try:
                        loaded = load(path)  # checked here: a broken file is a row, not a failed task
                    except (GdmRayError, RuntimeError) as exc:
                        fail(path, exc)
                        continue
                    refs[path.stem] = put_model(path.stem, path, loaded.sha256, arch, splits.shape, splits.eval.num_classes)
                plan = plan_scan(splits.defense, scfg, torch.Generator().manual_seed(int(cfg.seed)))
                found, errors = run_first_passes(rcfg, refs.values(), splits.defense, scfg, plan, resume, ray_log, progress)
                for mid, msg in errors.items():
                    fail(by_id[mid], RuntimeError(msg))
                passes = {m: scan_result(plan, scfg, found[m], ray_log.seconds[m]) for m in refs if m in found}
            else:
                for i, path in enumerate(files, 1):
                    try:
                        passes[path.stem] = first_pass(cfg, load(path), splits, torch.Generator().manual_seed(int(cfg.seed)), path.stem,
                                                      resume)  # fmt: skip
                    except (GdmRayError, RuntimeError) as exc:  # a broken model is a finding, not a reason to stop
                        fail(path, exc)
                        continue
                    print(f"[{i}/{len(files)}] first pass {path.stem}: {passes[path.stem].seconds:.0f}s", file=sys.stderr, flush=True)
            # 2. with enough models, each class's trigger size is judged against the
            #    same class in the other models (a natural trigger is not an anomaly)
            reference = "zoo" if calibrate and len(passes) >= MIN_ZOO else "model"
            if reference == "zoo":
                ids = list(passes)
                table = reference_anomaly([[c.size for c in passes[m].classes] for m in ids])
                passes = {m: rescore(passes[m], a) for m, a in zip(ids, table)}
            # 3. the full search of every flagged class, then the rows
            searches: dict[tuple[str, int], ClassSearch] = {}
            full, window = bool(cfg.get("full_search", True)), bool(scfg.moving_window)
            if ray_log is not None and scfg.method != "baseline" and (full or window):
                base = search_base(torch.Generator().manual_seed(int(cfg.seed) + 1))  # what scan_model draws from its generator
                asks = [(refs[m], k, base + k) for m in passes for k in passes[m].flagged]
                mcfg = typed(MESAConfig, cfg.mesa, "mesa") if full else None
                searches, errors = run_class_searches(rcfg, asks, splits.defense, splits.eval, scfg, mcfg, window, int(cfg.seed),
                                                      ray_log, progress)  # fmt: skip
                for mid, msg in errors.items():
                    fail(by_id[mid], RuntimeError(msg))
            verdicts: list[dict[str, Any]] = []
            classes: list[dict[str, Any]] = []
            for path in files:
                mid = path.stem
                if mid in passes and mid not in failed:
                    given = {k: v for (m, k), v in searches.items() if m == mid} if ray_log is not None else None
                    try:
                        verdict, rows, _ = scan_model(cfg, load(path), splits, run_dir, torch.Generator().manual_seed(int(cfg.seed) + 1),
                                                      mid, prefix=f"{mid}/", result=passes[mid], reference=reference,
                                                      searches=given)  # fmt: skip
                    except (GdmRayError, RuntimeError) as exc:
                        fail(path, exc)
                if mid in failed:
                    verdict, rows = failed[mid], []
                verdicts.append(verdict)
                classes.extend(rows)
                state = ("ERROR: " + verdict["error"]) if verdict["error"] else (
                    f"BACKDOORED -> {verdict['flagged']}" if verdict["backdoored"] else "clean")
                score = f"{verdict['score']:6.2f}" if verdict["score"] is not None else "     -"
                print(f"  {mid:<24} score {score}  {state}", file=sys.stderr, flush=True)
            run_dir.write_table("verdicts.parquet", verdicts, VERDICT_SCHEMA, "verdicts")
            run_dir.write_table("classes.parquet", classes, CLASS_SCHEMA, "classes")
            save_zoo_scores(run_dir.path("scores.png"), [v["model_id"] for v in verdicts], [v["score"] for v in verdicts],
                            float(scfg.threshold), f"zoo-scan of {folder.name}: anomaly score per model")  # fmt: skip
            write_json(run_dir.path("zoo.json"), {"zoo": str(folder), "models": len(files), "scan": plain(cfg.scan), "reference": reference,
                                                  "verdicts": verdicts, "seconds": round(time.perf_counter() - t0, 2),
                                                  "ray": ray_log.summary() if ray_log is not None else None,
                                                  "resumed_chunks": resume.resumed})  # fmt: skip
    finally:
        if started:
            import ray

            ray.shutdown()
    resume.clear()  # published: nothing left to resume
    width = max(len(v["model_id"]) for v in verdicts)
    print(f"  {'model'.ljust(width)}  verdict      score  target  flagged   seconds")
    for v in verdicts:
        if v["error"]:
            print(f"  {v['model_id'].ljust(width)}  ERROR        {'-':>5}  {'-':>6}  {'':8}  {'-':>7}  {v['error']}")
            continue
        target = "-" if v["target_class"] is None else str(v["target_class"])
        print(f"  {v['model_id'].ljust(width)}  {'BACKDOORED' if v['backdoored'] else 'clean':<10}  {v['score']:>5.2f}  "
              f"{target:>6}  {','.join(map(str, v['flagged'])):<8}  {v['seconds']:>7.1f}")  # fmt: skip
    bad = sum(1 for v in verdicts if v["backdoored"])
    failed = sum(1 for v in verdicts if v["error"])
    print(f"{len(verdicts)} models: {bad} backdoored, {len(verdicts) - bad - failed} clean, {failed} failed to load "
          f"({time.perf_counter() - t0:.0f}s)")  # fmt: skip
    print(f"wrote {run_dir.location}")
    return {"verdicts": verdicts, "out": run_dir.location}
