"""`gdm-ray zoo-scan`: scan every model file in a folder, one verdict row each.

A thin command: one plan for the whole zoo (every model starts from the same
seed, so its verdict does not depend on its neighbours in the folder), run
as Ray tasks or in this process (``use_ray``; the same answers), then each
model's pictures and ensembles, the Parquet rows and the printed table. A
model alone in its folder with an example folder beside it (TrojAI's
``clean-example-data/``) is scanned on those images instead of ``data=``
when ``zoo.examples`` and it holds at least ``zoo.min_examples`` of them; the
verdict row's ``examples`` column says which set each model was scanned on.
A model that cannot be read, loaded or scanned, or whose example folder
cannot be read, gets a row with its error and the scan goes on.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gdm_ray.cli.common import load_data, load_options, setup
from gdm_ray.cli.scan import check_window, executor_for, stage_progress, write_model_files
from gdm_ray.cli.settings import ZooScanSettings, plain
from gdm_ray.core.data import ImageSet, Splits
from gdm_ray.core.errors import ConfigError, DataError, ModelLoadError
from gdm_ray.core.examples import EXAMPLE_FOLDERS, count_examples, example_set, find_examples
from gdm_ray.core.executor import ModelBlob, one_line
from gdm_ray.core.model_io import MODEL_SUFFIXES, file_sha256
from gdm_ray.core.plots import save_zoo_scores
from gdm_ray.core.scan_workflow import MIN_ZOO, ZooScan, ZooScanPlan, plan_zoo_scan, run_zoo_scan
from gdm_ray.core.weights import trusted_program
from gdm_ray.store import CLASS_SCHEMA, VERDICT_SCHEMA, RunDir, code_version, config_hash, write_json
from gdm_ray.store.fetch import localize
from gdm_ray.store.rows import Provenance, class_rows, examples_note, failed_row, verdict_row
from gdm_ray.store.scanstate import ScanState

__all__ = ["zoo_scan", "list_models", "ZooModel", "MODEL_SUFFIXES", "MIN_ZOO"]


# folders beside a model that hold no models: TrojAI's example images, gdm-ray's own outputs
_NOT_MODELS = {*EXAMPLE_FOLDERS, "poisoned-example-data", "example_data", "ensemble"}


@dataclass(frozen=True)
class ZooModel:
    """One model of a zoo: its id (from its folder or its file), its file, and
    the clean example folder beside it (a model alone in its folder only)."""

    model_id: str
    path: Path
    examples: Path | None = None


def list_models(folder: Path, pattern: str = "*") -> list[ZooModel]:
    """Every model file under ``folder`` (any depth) whose name or relative path matches ``pattern``.

    A model alone in its own folder is named by that folder (TrojAI's
    ``id-00000001/model.pt`` is ``id-00000001``; nested: ``round1/id-00000001``)
    and owns the example folder there, if any (``clean-example-data/``,
    ``clean_example_data/`` or ``examples/``); otherwise it is named by its path
    less the suffix (``vendor-a.pt`` is ``vendor-a``). Example data, hidden
    folders and ensembles are not models. Ids must be unique."""
    if not folder.is_dir():
        raise ConfigError(f"zoo.path={folder}: no such folder")
    found = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not p.is_file() or p.suffix.lower() not in MODEL_SUFFIXES:
            continue
        if any(part.startswith(".") or part in _NOT_MODELS for part in rel.parts[:-1]):
            continue
        if fnmatch.fnmatch(p.name, pattern) or fnmatch.fnmatch(rel.as_posix(), pattern):
            found.append(p)
    if not found:
        raise ConfigError(f"zoo.path={folder}: no model files matching {pattern!r} ({', '.join(MODEL_SUFFIXES)})")
    per_folder = Counter(p.parent for p in found)
    seen: dict[str, Path] = {}
    models = []
    for p in found:
        where = p.parent.relative_to(folder)
        if p.parent != folder and per_folder[p.parent] == 1:
            mid = where.as_posix()
        else:
            mid = (where / p.stem).as_posix() if p.parent != folder else p.stem
        if mid in seen:
            a, b = seen[mid].relative_to(folder), p.relative_to(folder)
            raise ConfigError(f"zoo.path={folder}: {a} and {b} share the model id {mid!r}")
        seen[mid] = p
        models.append(ZooModel(mid, p, find_examples(p) if per_folder[p.parent] == 1 else None))
    return models


@dataclass
class _Examples:
    """Which clean images each model is scanned on: its own (model id -> images), a
    note for each verdict row, and the models whose example folder is unreadable."""

    own: dict[str, ImageSet]
    notes: dict[str, str]
    errors: dict[str, str]


def _examples(files: list[ZooModel], s: ZooScanSettings, splits: Splits) -> _Examples:
    """Each model's own examples when it has enough, else the shared set (and why)."""
    out = _Examples({}, {}, {})
    for m in files:
        if m.examples is None:
            out.notes[m.model_id] = examples_note(None)
            continue
        n = count_examples(m.examples)
        if not s.zoo.examples:
            out.notes[m.model_id] = examples_note(None, f"own:{n} unused, zoo.examples=false")
        elif n < int(s.zoo.min_examples):  # too few: a small set's first pass gives clean models high scores
            out.notes[m.model_id] = examples_note(None, f"own:{n} < zoo.min_examples={s.zoo.min_examples}")
        else:
            try:
                out.own[m.model_id] = example_set(m.examples, splits.classes, splits.shape)
                out.notes[m.model_id] = examples_note(len(out.own[m.model_id]))
            except DataError as exc:
                out.errors[m.model_id] = f"examples {one_line(exc)}"
    return out


def _read_models(
    files: list[ZooModel], s: ZooScanSettings, splits: Splits, prov: Provenance, ex: _Examples
) -> tuple[list[ModelBlob], dict[str, dict[str, Any]]]:
    """Each file's bytes for the jobs; a file (or example folder) that cannot be read is a failed row."""
    blobs, failed = [], {}
    opts = load_options(s.arch, s.model)
    for m in files:
        p = m.path
        if m.model_id in ex.errors:
            failed[m.model_id] = failed_row(m.model_id, str(p), None, ex.errors[m.model_id], s.scan.method, prov)
            continue
        try:
            # a trusted pickle is converted here, once; jobs get its .pt2 program and never unpickle
            src = trusted_program(p, opts, splits.shape) if opts.allow_pickle else None
            data = (src or p).read_bytes()
        except (OSError, ModelLoadError) as exc:
            failed[m.model_id] = failed_row(m.model_id, str(p), None, one_line(exc), s.scan.method, prov, ex.notes[m.model_id])
            continue
        job_opts = dataclasses.replace(opts, allow_pickle=False)
        blobs.append(ModelBlob(m.model_id, str(p), file_sha256(p), data, job_opts, splits.shape, splits.eval.num_classes))
    return blobs, failed


def _rows(
    run_dir: RunDir,
    files: list[ZooModel],
    done: ZooScan | None,
    plan: ZooScanPlan | None,
    failed: dict[str, dict[str, Any]],
    s: ZooScanSettings,
    splits: Splits,
    prov: Provenance,
    ex: _Examples,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every model's verdict row in folder order (and its files), and the class rows."""
    verdicts, classes = [], []
    for m in files:
        mid = m.model_id
        scan = done.models.get(mid) if done is not None else None
        if scan is None:
            verdict = failed[mid]
        else:
            verdict = verdict_row(scan, s.scan.method, done.reference, prov, examples=ex.notes[mid])
            if scan.error is None:
                data = ex.own.get(mid, splits.defense)
                extra = write_model_files(run_dir, f"{mid}/", scan, data, plan, s.samples_per_level)
                rows = class_rows(scan, splits.classes, prov)
                detail = {str(k): v for k, v in extra.items()}
                write_json(
                    run_dir.path(f"{mid}/scan.json"),
                    {
                        **verdict,
                        "classes": rows,
                        "scan": dataclasses.asdict(s.scan),
                        "flagged_detail": detail,
                        "reference_path": None,
                        "reference_models": 0,
                        "resumed_chunks": 0,
                    },
                )
                classes.extend(rows)
        verdicts.append(verdict)
        state = (
            ("ERROR: " + verdict["error"])
            if verdict["error"]
            else (f"BACKDOORED -> {verdict['flagged']}" if verdict["backdoored"] else "clean")
        )
        score = f"{verdict['score']:6.2f}" if verdict["score"] is not None else "     -"
        print(f"  {mid:<24} score {score}  {state}", file=sys.stderr, flush=True)
    return verdicts, classes


def _print_verdicts(verdicts: list[dict[str, Any]], seconds: float) -> None:
    width = max(len(v["model_id"]) for v in verdicts)
    print(f"  {'model'.ljust(width)}  verdict      score  target  flagged   seconds")
    for v in verdicts:
        if v["error"]:
            print(f"  {v['model_id'].ljust(width)}  ERROR        {'-':>5}  {'-':>6}  {'':8}  {'-':>7}  {v['error']}")
            continue
        target = "-" if v["target_class"] is None else str(v["target_class"])
        print(
            f"  {v['model_id'].ljust(width)}  {'BACKDOORED' if v['backdoored'] else 'clean':<10}  {v['score']:>5.2f}  "
            f"{target:>6}  {','.join(map(str, v['flagged'])):<8}  {v['seconds']:>7.1f}"
        )
    bad = sum(1 for v in verdicts if v["backdoored"])
    failed = sum(1 for v in verdicts if v["error"])
    print(f"{len(verdicts)} models: {bad} backdoored, {len(verdicts) - bad - failed} clean, {failed} failed to load ({seconds:.0f}s)")


def _run(
    s: ZooScanSettings, blobs: list[ModelBlob], splits: Splits, device: str, state: ScanState, examples: dict[str, ImageSet]
) -> tuple[ZooScan | None, ZooScanPlan | None, dict[str, Any] | None]:
    """The zoo's plan run on the chosen executor; the Ray task summary (None in one process)."""
    if not blobs:
        return None, None, None
    ids = [b.model_id for b in blobs]
    own = {m: examples[m] for m in ids if m in examples}  # a model whose file could not be read is not planned
    plan = plan_zoo_scan(splits.defense, ids, s.scan, s.mesa, s.seed, s.full_search, s.zoo.calibrate, examples=own)
    with executor_for(s.use_ray, s.ray) as ex, stage_progress(s.progress) as progress:
        done = run_zoo_scan(plan, blobs, splits.defense, splits.eval, ex, device, state, progress, examples=own)
    tasks = {"tasks_run": ex.summary()["tasks_run"], "tasks_resumed": done.resumed, "nodes": ex.summary()["nodes"]}
    return done, plan, tasks if s.use_ray else None


def zoo_scan(s: ZooScanSettings) -> dict[str, Any]:
    """Scan each model in zoo.path; a model that fails to load or scan gets a row with its error."""
    device = setup(s)
    folder = localize(str(s.zoo.path), s.store, "zoo.path")
    files = list_models(folder, str(s.zoo.glob or "*"))
    splits = load_data(s.data)
    check_window(s.scan, splits.shape)
    prov = Provenance(config_hash(plain(s)), code_version())
    ex = _examples(files, s, splits)
    print(
        f"gdm-ray zoo-scan: {len(files)} models in {folder}, {splits.eval.num_classes} classes, "
        f"{len(splits.defense)} clean images ({len(ex.own)} model(s) on their own examples), method {s.scan.method}",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    with RunDir(s.out, "zoo-scan", s.store, s.dataset) as run_dir:
        # finished first-pass chunks wait beside the output until it is published:
        # the same zoo-scan run again with the same out= resumes from them
        state = ScanState(run_dir.state_dir() if s.out else None)
        blobs, failed = _read_models(files, s, splits, prov, ex)
        done, plan, tasks = _run(s, blobs, splits, str(device), state, ex.own)
        verdicts, classes = _rows(run_dir, files, done, plan, failed, s, splits, prov, ex)
        run_dir.write_table("verdicts.parquet", verdicts, VERDICT_SCHEMA, "verdicts")
        run_dir.write_table("classes.parquet", classes, CLASS_SCHEMA, "classes")
        save_zoo_scores(
            run_dir.path("scores.png"),
            [v["model_id"] for v in verdicts],
            [v["score"] for v in verdicts],
            float(s.scan.threshold),
            f"zoo-scan of {folder.name}: anomaly score per model",
        )
        write_json(
            run_dir.path("zoo.json"),
            {
                "zoo": str(folder),
                "models": len(files),
                "scan": dataclasses.asdict(s.scan),
                "reference": done.reference if done else "model",
                "verdicts": verdicts,
                "seconds": round(time.perf_counter() - t0, 2),
                "ray": tasks,
                "resumed_chunks": state.resumed,
            },
        )
    state.clear()  # published: nothing left to resume
    _print_verdicts(verdicts, time.perf_counter() - t0)
    print(f"wrote {run_dir.location}")
    return {"verdicts": verdicts, "out": run_dir.location}
