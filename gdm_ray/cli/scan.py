"""`gdm-ray scan`: is this model backdoored, and to which class(es)?

A thin command: plan the scan (gdm_ray.core.scan_workflow), run it in this
process or as Ray tasks (``use_ray``; the same plan gives the same verdict),
write the pictures, ensembles and Parquet rows, print the table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from gdm_ray.cli.common import load_data, load_options, model_file, setup
from gdm_ray.cli.settings import ModelOptions, ScanSettings, plain
from gdm_ray.core.data import ImageSet, Splits
from gdm_ray.core.ensemble import save_ensemble
from gdm_ray.core.errors import ConfigError, GdmRayError
from gdm_ray.core.executor import Executor, InProcessExecutor, ModelBlob
from gdm_ray.core.first_pass import ScanConfig
from gdm_ray.core.mesa import MESA
from gdm_ray.core.model_io import LoadedModel, load_model, shipped_file
from gdm_ray.core.plots import save_curves, save_heatmap, save_level_grid
from gdm_ray.core.scan_workflow import ModelScan, Progress, ZooScanPlan, plan_model_scan, run_zoo_scan
from gdm_ray.core.train import model_device
from gdm_ray.distributed.runtime import RayConfig
from gdm_ray.store import CLASS_SCHEMA, VERDICT_SCHEMA, RunDir, code_version, config_hash, read_rows, write_json
from gdm_ray.store.fetch import localize
from gdm_ray.store.rows import Provenance, class_rows, verdict_row
from gdm_ray.store.scanstate import ScanState

__all__ = [
    "scan",
    "scan_one_model",
    "scan_settings_from",
    "reference_sizes",
    "write_model_files",
    "executor_for",
    "stage_progress",
    "check_window",
]

# the first-pass settings that decide a trigger's size: sizes found with
# other settings are not comparable
_SIZE_KEYS = ("method", "steps", "batch_size", "lr", "init_cost", "cost_step", "patience", "asr_goal")


def executor_for(use_ray: bool, ray: RayConfig) -> contextlib.AbstractContextManager:
    """The executor a command runs its plan with (a context manager: Ray starts and stops with it)."""
    if use_ray:
        from gdm_ray.distributed.executor import RayExecutor

        return RayExecutor(ray)
    return InProcessExecutor()


@contextlib.contextmanager
def stage_progress(enabled: bool) -> Iterator[Progress | None]:
    """A tqdm bar on stderr per workflow stage, counting finished jobs."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bars: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage) or bars.setdefault(
            stage, tqdm(total=total, desc=stage, unit="job", file=sys.stderr, mininterval=1.0, leave=False, dynamic_ncols=True)
        )
        bar.n = done
        bar.refresh()
        if done == total:
            bars.pop(stage).close()

    try:
        yield update
    finally:
        for bar in bars.values():
            bar.close()


def check_window(cfg: ScanConfig, shape: tuple[int, int, int]) -> None:
    _, H, W = shape
    if cfg.moving_window and cfg.window and (len(cfg.window) != 2 or cfg.window[0] > H or cfg.window[1] > W):
        raise ConfigError(f"scan.window={'x'.join(map(str, cfg.window))} does not fit the image {H}x{W}")


def _class_grid(path: Path, scan: ModelScan, names: list[str], title: str) -> None:
    """Each class's smallest trigger over grey, 10 classes a row, flagged ones marked."""
    result = scan.result
    rows, labels, titles = [], [], []
    for start in range(0, len(result.classes), 10):
        part = result.classes[start : start + 10]
        rows.append((torch.stack([c.pattern for c in part]), torch.stack([c.mask for c in part])))
        labels.append(f"classes\n{part[0].target}-{part[-1].target}")
        titles.append(
            [
                f"{'*' if c.target in result.flagged else ''}{c.target} {names[c.target][:9]}\n"
                f"{c.size:.0f}px {result.anomaly[start + i]:+.1f}"
                for i, c in enumerate(part)
            ]
        )
    save_level_grid(path, rows, title, labels, titles)


def write_model_files(
    run_dir: RunDir, prefix: str, scan: ModelScan, data: ImageSet, plan: ZooScanPlan, samples_per_level: int
) -> dict[int, dict[str, Any]]:
    """A scanned model's pictures and ensembles under ``prefix``; returns each flagged class's detail for scan.json."""
    mid = scan.model_id
    _class_grid(run_dir.path(f"{prefix}classes.png"), scan, data.classes, f"{mid}: smallest trigger per class (* flagged)")
    extra: dict[int, dict[str, Any]] = {}
    for k in scan.result.flagged:
        info: dict[str, Any] = {}
        found = scan.searches.get(k)
        heat = found.heat if found is not None else None
        if heat is not None:
            best = max(range(len(heat.windows)), key=lambda j: heat.strength[j])
            save_heatmap(
                run_dir.path(f"{prefix}class-{k}/heat.png"),
                heat.heat,
                data.x[0],
                heat.box,
                (heat.patterns[best], heat.masks[best]),
                f"{mid}: where class {k}'s trigger lives",
            )
            info.update(heat_peak=list(heat.peak), heat_box=list(heat.box), heat_max=float(heat.heat.max()))
        if found is not None and found.mesa is not None:
            mesa, res = found.mesa, found.result
            save_ensemble(
                mesa,
                res,
                run_dir.path(f"{prefix}class-{k}/ensemble"),
                scan.sha256,
                {"source_model": scan.path, "code_version": code_version()},
            )
            gk = torch.Generator().manual_seed(plan.class_seed(k))
            per_level = [mesa.sample(int(samples_per_level), rng=gk, level=i) for i in range(res.generators.levels)]
            save_level_grid(
                run_dir.path(f"{prefix}class-{k}/samples.png"),
                per_level,
                f"{mid}: MESA triggers for class {k}",
                [f"L{i} b={b:.2f}\nASR {a:.0%}" for i, (b, a) in enumerate(zip(res.betas, res.asr))],
            )
            save_curves(run_dir.path(f"{prefix}class-{k}/curves.png"), res.history, f"{mid}: MESA training, class {k}")
            info.update(mesa_level_asr=res.asr, mesa_weights=res.weights, mesa_asr_eval=found.asr_eval)
        extra[k] = info
    return extra


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
            raise ConfigError(
                f"reference={folder}: scanned with other first-pass settings ("
                + ", ".join(f"scan.{k}={used[k]} there, {mine[k]} here" for k in differ)
                + ")"
            )
    skip: set[str] = set()
    if exclude_sha256 and (folder / "verdicts.parquet").is_file():
        skip = {r["model_id"] for r in read_rows(folder / "verdicts.parquet") if r.get("model_sha256") == exclude_sha256}
    by_model: dict[str, dict[int, float]] = {}
    for r in read_rows(table):
        if r["model_id"] in skip:
            continue
        if not 0 <= int(r["class"]) < len(names) or r["class_name"] != names[int(r["class"])]:
            raise ConfigError(
                f"reference={folder}: model {r['model_id']} class {r['class']} ({r['class_name']!r}) is not a class of this data set"
            )
        by_model.setdefault(r["model_id"], {})[int(r["class"])] = float(r["trigger_size"])
    sizes = [[row[k] for k in range(len(names))] for row in by_model.values() if len(row) == len(names)]
    if len(sizes) < 2:
        raise ConfigError(f"reference={folder}: {len(sizes)} other scanned model(s); a reference needs at least 2")
    return sizes


ScanRows = tuple[dict[str, Any], list[dict[str, Any]], dict[int, MESA]]  # verdict row, class rows, MESA per flagged class


def _reference(s: ScanSettings, names: list[str], sha256: str) -> tuple[Path | None, list[list[float]] | None]:
    if not s.reference:
        return None, None
    ref = localize(str(s.reference), s.store, "reference")
    return ref, reference_sizes(ref, names, s.scan, sha256)


def scan_one_model(
    s: ScanSettings,
    loaded: LoadedModel,
    splits: Splits,
    run_dir: RunDir,
    state: ScanState | None = None,
    executor: Executor | None = None,
    provenance: Provenance | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ScanRows:
    """Scan every class of ``loaded`` (``s.model`` is not read; the model id
    is the file's stem), then search each flagged class (moving window with
    scan.moving_window, MESA with full_search); with ``s.reference`` the
    classes are judged against that finished zoo-scan's models. Writes
    classes.png, scan.json and class-K/ (heat.png, ensemble, samples.png,
    curves.png) in ``run_dir``; ``state`` resumes the first pass. Returns the
    verdict row, the class rows and the fitted MESA of each flagged class."""
    t0 = time.perf_counter()
    mid = Path(loaded.path).stem
    ref, others = _reference(s, splits.classes, loaded.sha256)  # fails before the search
    plan = plan_model_scan(splits.defense, mid, s.scan, s.mesa, s.seed, s.full_search, others)
    device, ex = str(model_device(loaded.module)), executor or InProcessExecutor()
    opts = dataclasses.replace(load_options(s.arch, s.model), allow_pickle=False)  # jobs get a trusted pickle's program instead
    blob = ModelBlob(mid, loaded.path, loaded.sha256, shipped_file(loaded).read_bytes(), opts, splits.shape, splits.eval.num_classes)
    done = run_zoo_scan(plan, [blob], splits.defense, splits.eval, ex, device, state, progress, loaded=loaded.module)
    scan = done.models[mid]
    if scan.error is not None:
        raise GdmRayError(f"scan {mid}: {scan.error}")
    extra = write_model_files(run_dir, "", scan, splits.defense, plan, s.samples_per_level)
    prov = provenance or Provenance(config_hash(plain(s)), code_version())
    verdict = verdict_row(scan, s.scan.method, done.reference, prov, time.perf_counter() - t0)
    classes = class_rows(scan, splits.classes, prov)
    detail = {"flagged_detail": {str(k): v for k, v in extra.items()}, "scan": dataclasses.asdict(s.scan),
              "reference_path": None if ref is None else str(ref), "reference_models": 0 if others is None else len(others),
              "resumed_chunks": done.resumed}  # fmt: skip
    write_json(run_dir.path("scan.json"), {**verdict, "classes": classes, **detail})
    return verdict, classes, {k: f.mesa for k, f in scan.searches.items() if f.mesa is not None}


def scan_settings_from(s: Any, model: ModelOptions) -> ScanSettings:
    """ScanSettings from another command's settings (defend's DefendSettings):
    the keys they share; full_search stays on (a repair models every flagged
    class), in one process."""
    skip = {"model", "use_ray", "full_search"}
    shared = {f.name: getattr(s, f.name) for f in dataclasses.fields(ScanSettings) if f.name not in skip and hasattr(s, f.name)}
    return ScanSettings(model=model, **shared)


def _print_result(verdict: dict[str, Any], classes: list[dict[str, Any]], seconds: float) -> None:
    width = max(len(c["class_name"]) for c in classes)
    print(f"  {'class'.ljust(width + 4)}  trigger px  ASR      anomaly  flagged")
    for c in sorted(classes, key=lambda c: -c["anomaly"]):
        print(
            f"  {c['class']:>2}  {c['class_name'].ljust(width)}  {c['trigger_size']:>10.1f}  {c['trigger_asr']:>6.1%}  "
            f"{c['anomaly']:>7.2f}  {'YES' if c['flagged'] else ''}"
        )
    target = verdict["target_class"]
    print(
        f"verdict: {'BACKDOORED' if verdict['backdoored'] else 'clean'} (score {verdict['score']:.2f}"
        + (f", target class {target}, flagged {verdict['flagged']}" if verdict["backdoored"] else "")
        + f"; {seconds:.0f}s)"
    )


def scan(s: ScanSettings) -> dict[str, Any]:
    """Scan every class of one model; print the verdict table."""
    device = setup(s)
    path = model_file(s.model.path, s.store)
    splits = load_data(s.data)
    check_window(s.scan, splits.shape)
    loaded = load_model(path, splits.shape, splits.eval.num_classes, device=device, options=load_options(s.arch, s.model))
    print(f"gdm-ray scan: {loaded.path}, {splits.eval.num_classes} classes, {len(splits.defense)} clean images", file=sys.stderr)
    t0 = time.perf_counter()
    with RunDir(s.out, "scan", s.store, s.dataset) as run_dir:
        # with an explicit out=, finished chunks of the first pass wait beside it: run again, it resumes
        state = ScanState(run_dir.state_dir()) if s.out else None
        with executor_for(s.use_ray, s.ray) as ex, stage_progress(s.progress) as progress:
            verdict, classes, _ = scan_one_model(s, loaded, splits, run_dir, state, ex, progress=progress)
        run_dir.write_table("verdict.parquet", [verdict], VERDICT_SCHEMA, "verdicts")
        run_dir.write_table("classes.parquet", classes, CLASS_SCHEMA, "classes")
    if state is not None:
        state.clear()
    if s.use_ray:
        tasks = ex.summary()
        print(
            f"Ray: {tasks['tasks_run']} tasks run, {state.resumed if state else 0} resumed, on {len(tasks['nodes'])} node(s)",
            file=sys.stderr,
        )
    _print_result(verdict, classes, time.perf_counter() - t0)
    print(f"wrote {run_dir.location}")
    return {**verdict, "out": run_dir.location}
