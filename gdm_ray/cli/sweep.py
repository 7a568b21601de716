"""`gdm-ray sweep`: a Ray Tune sweep of MESA (and defense) settings, each
trial scored by the defense it gives (configs/sweep.yaml says what is swept
and how a trial is scored; gdm_ray.distributed.sweep runs the trials)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gdm_ray.cli.common import load_options, print_table, setup
from gdm_ray.cli.search import _load, real_trigger
from gdm_ray.cli.settings import SweepSettings, build, plain
from gdm_ray.core.data import Splits
from gdm_ray.core.defense import DefenseConfig
from gdm_ray.core.errors import ConfigError, GdmRayError
from gdm_ray.core.mesa import MESAConfig
from gdm_ray.core.model_io import LoadedModel, shipped_file
from gdm_ray.core.plots import save_sweep
from gdm_ray.distributed.runtime import init_ray
from gdm_ray.distributed.sweep import (
    EXPERIMENT,
    SpaceParam,
    TrialContext,
    TrialRecord,
    apply_params,
    can_restore,
    combinations,
    param_fields,
    parse_space,
    run_tune,
)
from gdm_ray.store import PendingDataset, code_version, config_hash, trial_schema, write_json, write_rows
from gdm_ray.store.atomic import publish
from gdm_ray.store.fetch import cache_root
from gdm_ray.store.parquet import read_table
from gdm_ray.store.rundir import default_out
from gdm_ray.store.s3 import S3, S3Config, is_s3, join_uri
from gdm_ray.store.trial_rows import trial_rows

__all__ = ["sweep", "GROUPS"]

GROUPS = {"mesa": MESAConfig, "defense": DefenseConfig}  # config groups a sweep may vary
REQUEST = "request.json"  # what the sweep in a folder was started with (resume must match it)
SUMMARY = "sweep.json"  # written last: its presence means the sweep finished
TABLE = "trials.parquet"
PLOT = "trials.png"
# may change between a run and its resume (where and how, not what)
_NOT_RESUME_KEYS = ("ray", "out", "progress", "device", "store", "dataset")


@dataclass
class Where:
    """Where a sweep's files go: the local folder (for an s3:// out=, a mirror of it) and Tune's experiment."""

    final: Path
    s3_uri: str | None
    experiment: str | Path
    tune_fs: Any  # pyarrow's S3 filesystem for an s3:// out=, else None
    store: S3Config

    @property
    def name(self) -> str:
        return self.s3_uri or str(self.final)


def sweep(s: SweepSettings) -> dict[str, Any]:
    """Validate everything, then run (or resume, or just report) the sweep."""
    t0 = time.perf_counter()
    params, combos, base = _space(s)
    setup(dataclasses.replace(s, device="cpu"))  # seeds; trials pick their own device
    loaded, splits = _load(s, torch.device("cpu"))
    _check_fits(combos, base, splits.shape)
    real, real_target, real_spec = real_trigger(s.trigger, s.target_class, Path(loaded.path), splits)
    if real is None:
        raise ConfigError(
            f"model={loaded.path}: a sweep scores trials by the ASR of the real trigger; pass trigger=... "
            "(e.g. trigger=bw3x3) or keep the model's card (model.json) beside it"
        )
    where = _where(s)
    dataset = PendingDataset(s.dataset, where.name, s.store) if s.dataset else None  # checked now, written with the table
    body = {k: v for k, v in plain(s).items() if k not in _NOT_RESUME_KEYS}
    request_hash = config_hash({"config": body, "model_sha256": loaded.sha256})
    state = _out_state(where.final, request_hash, lambda: can_restore(where.experiment, where.tune_fs))
    if state == "done":
        if where.s3_uri and not S3(s.store).exists(join_uri(where.s3_uri, SUMMARY)):  # finished here, upload cut short
            _push(where.final, where.s3_uri, s.store)
        return _report_finished(where.final, where.name, dataset, Path(loaded.path).stem)
    ctx = _context(s, loaded, splits, base, params, real_spec, real_target)
    what = f"{len(combos)} grid trials" if s.sweep.mode == "grid" else f"{s.sweep.num_samples} random draws"
    print(
        f"gdm-ray sweep: {loaded.path}, class {s.target_class}, {what} over {', '.join(p.key for p in params)}; "
        f"search and retrain on {len(splits.defense)} clean images, metrics on {len(splits.eval)} held-out images"
        + (f"; resuming {where.name}" if state == "resume" else ""),
        file=sys.stderr,
    )
    records, resumed = _run(s, where, state, request_hash, loaded, params, ctx)
    rows = _rows(s, records, params, base)
    summary = _summary(s, rows, params, where, resumed, loaded, real_spec, real_target, request_hash, t0)
    _publish(s, where, rows, params, summary, dataset, Path(loaded.path).stem)
    _print(summary, rows, params)
    print(f"wrote {where.name}")
    if summary["best"] is None:
        first = next((r["error"] for r in rows if r["error"]), "no metric")
        raise GdmRayError(f"no trial of the sweep in {where.name} finished ({len(rows)} failed; first: {first}); see {summary['table']}")
    return {**summary, "out": where.name}


def _context(s: SweepSettings, loaded: LoadedModel, splits: Splits, base: dict[str, dict], params: list[SpaceParam],
             real_spec: dict | None, real_target: int | None) -> TrialContext:  # fmt: skip
    """What every trial gets through Ray's object store: the model's bytes, the two splits, the base settings."""
    return TrialContext(
        model_bytes=shipped_file(loaded).read_bytes(), model_suffix=shipped_file(loaded).suffix or ".pt",
        options=dataclasses.replace(load_options(s.arch, s.model), allow_pickle=False),
        defense=splits.defense, eval=splits.eval, target=s.target_class,
        real_trigger=real_spec, real_target=real_target, base=base, keys=[p.key for p in params], seed=s.seed,
        device=s.device, cpus=float(s.ray.task_cpus), gpus=float(s.ray.task_gpus), keep_freed_memory=s.ray.keep_freed_memory,
    )  # fmt: skip


def _space(s: SweepSettings) -> tuple[list[SpaceParam], list[dict[str, Any]], dict[str, dict]]:
    """The swept parameters, the settings to check before starting, and the groups' base values."""
    params = parse_space(s.sweep.search_space, s.sweep.mode, GROUPS)
    base = {"mesa": dataclasses.asdict(s.mesa), "defense": dataclasses.asdict(s.defense)}
    combos = combinations(params, s.sweep.mode)
    for combo in combos:  # every grid point (random mode: every option and bound) makes valid configs
        groups = apply_params(base, combo)
        build(MESAConfig, groups["mesa"], "mesa")
        build(DefenseConfig, groups["defense"], "defense")
    return params, combos, base


def _check_fits(combos: list[dict[str, Any]], base: dict[str, dict], shape: tuple[int, int, int]) -> None:
    """Every trial's trigger (and fixed position) fits the image."""
    _, H, W = shape
    for combo in combos:
        m = apply_params(base, combo)["mesa"]
        if m.get("trigger_size") is None:  # estimated per search: it fits by construction
            continue
        th, tw = (int(v) for v in m["trigger_size"])
        if th > H or tw > W:
            raise ConfigError(f"mesa.trigger_size={[th, tw]} is larger than the image {H}x{W}")
        if m.get("position") is not None:
            r, c = (int(v) for v in m["position"])
            if not (0 <= r <= H - th and 0 <= c <= W - tw):
                raise ConfigError(f"mesa.position={[r, c]} does not fit a {th}x{tw} trigger in the image {H}x{W}")


def _where(s: SweepSettings) -> Where:
    """An s3:// out= keeps Tune's experiment on S3 and stages the rest in a local mirror; else a folder."""
    s3_uri = str(s.out).rstrip("/") if is_s3(str(s.out or "")) else None
    if s3_uri is None:
        final = (Path(s.out) if s.out else default_out("sweep")).resolve()
        return Where(final, None, final / EXPERIMENT, None, s.store)
    S3(s.store).check_bucket(s3_uri)
    final = cache_root() / "sweeps" / hashlib.sha256(s3_uri.encode()).hexdigest()[:24]
    _pull(s3_uri, final, s.store)
    return Where(final, s3_uri, s3_uri.removeprefix("s3://") + "/" + EXPERIMENT, s.store.arrow_fs(), s.store)


def _run(
    s: SweepSettings, where: Where, state: str, request_hash: str, loaded: LoadedModel, params: list[SpaceParam], ctx: TrialContext
) -> tuple[list[TrialRecord], bool]:
    """Start Ray, write the request, run or resume Tune; an interrupted sweep leaves what resumes it."""
    started = init_ray(s.ray)
    created = not where.final.exists()
    try:
        if state == "new":
            _start(s, where, request_hash, loaded)
        records, resumed = run_tune(where.experiment, params, s.sweep, ctx, s.ray, verbose=1 if s.progress else 0, filesystem=where.tune_fs)
    except BaseException:
        if state == "new" and not can_restore(where.experiment, where.tune_fs):  # nothing to resume: leave no request behind
            if created:
                shutil.rmtree(where.final, ignore_errors=True)
            if where.s3_uri:
                with contextlib.suppress(GdmRayError):
                    S3(s.store).delete(join_uri(where.s3_uri, REQUEST))
        raise
    finally:
        if started:
            import ray

            ray.shutdown()
    pending = [r for r in records if not r.finished]
    if pending:
        print(
            f"gdm-ray sweep: interrupted with {len(records) - len(pending)} of {len(records)} trials finished; "
            f"run the same command (out={where.name}) to resume",
            file=sys.stderr,
        )
        raise KeyboardInterrupt
    return records, resumed


def _start(s: SweepSettings, where: Where, request_hash: str, loaded: LoadedModel) -> None:
    """A new sweep's folder and request.json (on S3 too, so another machine can check it and resume)."""
    if isinstance(where.experiment, Path) and where.experiment.exists():  # killed before Tune saved any state: start over
        shutil.rmtree(where.experiment)
    where.final.mkdir(parents=True, exist_ok=True)
    write_json(
        where.final / REQUEST,
        {
            "request_hash": request_hash,
            "model": loaded.path,
            "model_sha256": loaded.sha256,
            "config": plain(s),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    if where.s3_uri:
        S3(s.store).put_file(join_uri(where.s3_uri, REQUEST), where.final / REQUEST)


def _rows(s: SweepSettings, records: list[TrialRecord], params: list[SpaceParam], base: dict[str, dict]) -> list[dict[str, Any]]:
    """trials.parquet rows; each trial's config hash covers its own settings."""
    row_base = {k: v for k, v in plain(s).items() if k not in ("sweep", "ray")}
    hashes = [config_hash({**row_base, **apply_params(base, r.params)}) for r in records]
    return trial_rows(records, param_fields(params, GROUPS), hashes, code_version())


def _summary(
    s: SweepSettings,
    rows: list[dict[str, Any]],
    params: list[SpaceParam],
    where: Where,
    resumed: bool,
    loaded: LoadedModel,
    real_spec: dict | None,
    real_target: int | None,
    request_hash: str,
    t0: float,
) -> dict[str, Any]:
    """sweep.json: the best trial by sweep.metric and what the sweep was."""
    metric = s.sweep.metric
    scored = [i for i, r in enumerate(rows) if r["status"] == "TERMINATED" and r[metric] is not None]
    best_i = min(scored, key=lambda i: (rows[i][metric], i)) if scored else None
    best = rows[best_i] if best_i is not None else None
    keys = ("objective", "asr_after", "acc_drop", "found_asr_after", "asr_before", "acc_before", "acc_after", "found_asr_before", "seconds")
    return {
        "best_trial": best["trial_id"] if best else None,
        "best": {p.key: best[p.key] for p in params} if best else None,
        "best_metrics": {k: best[k] for k in keys} if best else None,
        "metric": metric,
        "mode": s.sweep.mode,
        "num_samples": int(s.sweep.num_samples),
        "space": {p.key: p.spec() for p in params},
        "trials": len(rows),
        "errors": sum(r["status"] != "TERMINATED" for r in rows),
        "resumed": resumed,
        "model": loaded.path,
        "model_sha256": loaded.sha256,
        "target_class": s.target_class,
        "real_trigger": real_spec,
        "real_target": real_target,
        "table": join_uri(where.name, TABLE),
        "plot": join_uri(where.name, PLOT),
        "experiment": join_uri(where.name, EXPERIMENT),
        "config_hash": config_hash(plain(s)),
        "request_hash": request_hash,
        "code_version": code_version(),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _publish(
    s: SweepSettings,
    where: Where,
    rows: list[dict[str, Any]],
    params: list[SpaceParam],
    summary: dict[str, Any],
    dataset: PendingDataset | None,
    model_id: str,
) -> None:
    """The table, the plot, then the summary (last: its presence means the sweep is whole); S3 and the dataset after."""
    fields = param_fields(params, GROUPS)
    write_rows(where.final / TABLE, rows, trial_schema(fields))
    best_i = next((i for i, r in enumerate(rows) if r["trial_id"] == summary["best_trial"]), None)
    _plot(where.final / PLOT, rows, params, best_i, summary["metric"])
    write_json(where.final / SUMMARY, summary)
    if where.s3_uri:
        _push(where.final, where.s3_uri, s.store)
    if dataset is not None:
        dataset.add("trials", rows, trial_schema(fields), model=model_id)
        dataset.publish()


def _pull(uri: str, mirror: Path, store: S3Config) -> None:
    """S3 is the sweep's one source of truth: the mirror is rebuilt from it on
    every start. A finished sweep (its summary is there) is reported, not rerun,
    on any machine; an unfinished one brings its request, which _out_state
    checks before Tune resumes the experiment from S3."""
    shutil.rmtree(mirror, ignore_errors=True)
    s3 = S3(store)
    names = (REQUEST, TABLE, SUMMARY) if s3.exists(join_uri(uri, SUMMARY)) else (REQUEST,)
    for name in names:
        if s3.exists(join_uri(uri, name)):
            s3.download(join_uri(uri, name), mirror / name)


def _push(mirror: Path, uri: str, store: S3Config) -> None:
    """Upload the finished sweep's request, table and plot (Tune wrote its experiment
    there itself), the summary last (its presence on S3 means the sweep is whole)."""
    s3 = S3(store)
    files = sorted((p for p in mirror.rglob("*") if p.is_file()), key=lambda p: (p.name == SUMMARY, str(p)))
    for f in files:
        s3.put_file(join_uri(uri, f.relative_to(mirror).as_posix()), f)


def _out_state(final: Path, request_hash: str, restorable: Callable[[], bool]) -> str:
    """new | resume | done for the folder out= names; a folder holding
    something else, or a sweep of another config, is an error."""
    if not final.exists():
        return "new"
    if not final.is_dir():
        raise ConfigError(f"out={final} exists and is not a folder")
    request = final / REQUEST
    if not request.is_file():
        if any(p for p in final.iterdir() if not p.name.startswith(".")):
            raise ConfigError(f"out={final} exists and holds no sweep to resume; pick a new folder")
        return "new"
    import json

    try:
        old = json.loads(request.read_text()).get("request_hash")
    except (OSError, json.JSONDecodeError):
        raise ConfigError(f"out={final}: {REQUEST} is not valid JSON; pick a new folder") from None
    if old != request_hash:
        raise ConfigError(
            f"out={final} holds a sweep started with other settings (hash {old}, now {request_hash}); "
            "rerun it with the same model, data, space and settings to resume, or pick a new out="
        )
    if (final / SUMMARY).is_file() and (final / TABLE).is_file():
        return "done"
    return "resume" if restorable() else "new"


def _report_finished(final: Path, where: str, dataset: PendingDataset | None, model_id: str) -> dict[str, Any]:
    import json

    summary = json.loads((final / SUMMARY).read_text())
    table = read_table(final / TABLE)
    rows = table.to_pylist()
    if dataset is not None:  # a finished sweep run again with dataset=: add its rows
        dataset.add("trials", rows, table.schema, model=model_id)
        dataset.publish()
    print(f"gdm-ray sweep: the sweep in {where} has finished ({summary['trials']} trials); nothing to run", file=sys.stderr)
    params = [SpaceParam(k, next(iter(v)), tuple(next(iter(v.values())))) for k, v in summary["space"].items()]
    _print(summary, rows, params)
    if summary.get("best") is None:
        raise GdmRayError(f"no trial of the sweep in {where} finished; see {join_uri(where, TABLE)}")
    return {**summary, "out": where, "already_finished": True}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "x".join(_fmt(x) for x in v) if all(isinstance(x, int) for x in v) else "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _print(summary: dict[str, Any], rows: list[dict[str, Any]], params: list[SpaceParam]) -> None:
    metric = summary["metric"]
    head = ["trial", *(p.key for p in params), metric, "ASR after", "acc drop (pts)", "status"]
    cols = [head]
    for r in rows:
        asr = "-" if r["asr_after"] is None else f"{r['asr_after']:.2%}"
        drop = "-" if r["acc_drop"] is None else f"{r['acc_drop']:.2f}"
        status = r["status"] if not r["error"] else f"{r['status']}: {r['error'][:60]}"
        mark = " *" if r["trial_id"] == summary.get("best_trial") else ""
        cols.append([r["trial_id"] + mark, *(_fmt(r[p.key]) for p in params), _fmt(r[metric]), asr, drop, status])
    widths = [max(len(c[i]) for c in cols) for i in range(len(head))]
    for line in cols:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())
    best = summary.get("best")
    if best is not None:
        m = summary["best_metrics"]
        print_table(
            [
                ("best trial", f"{summary['best_trial']} (lowest {metric})"),
                *((f"best {k}", _fmt(v)) for k, v in best.items()),
                ("ASR of the real trigger", f"{m['asr_before']:.2%} -> {m['asr_after']:.2%}"),
                ("clean accuracy", f"{m['acc_before']:.2%} -> {m['acc_after']:.2%}"),
                ("table", summary["table"]),
            ]
        )


def _plot(path: Path, rows: list[dict[str, Any]], params: list[SpaceParam], best: int | None, metric: str) -> None:
    """trials.png: the metric per trial, and the ASR after the defense against
    alpha (or the first float parameter), coloured by the other parameters."""
    import tempfile

    def short(p: SpaceParam, v: Any) -> str:
        return f"{p.name}={_fmt(v)}"

    names = [f"{r['trial_id'].rsplit('_', 1)[-1]}: " + " ".join(short(p, r[p.key]) for p in params) for r in rows]
    values = [r[metric] if r["status"] == "TERMINATED" else None for r in rows]
    floats = [p for p in params if all(isinstance(r[p.key], float) for r in rows)]
    xp = next((p for p in floats if p.key == "mesa.alpha"), floats[0] if floats else None)
    kwargs: dict[str, Any] = {}
    if xp is not None and rows:
        others = [p for p in params if p is not xp]
        kwargs = {
            "x_name": xp.key,
            "xs": [float(r[xp.key]) for r in rows],
            "ys": [r["asr_after"] for r in rows],
            "groups": [" ".join(short(p, r[p.key]) for p in others) for r in rows] if others else None,
        }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    import os

    os.close(fd)
    try:
        save_sweep(Path(tmp), names, values, best, metric, title=f"sweep: {metric} per trial (best green)", **kwargs)
        publish(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
