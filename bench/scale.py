"""Scale bench: the per-class scan of one Fashion-MNIST model on Ray with 1 and
2 workers, against the pure core in one process; and a Tune sweep.

    python bench/scale.py             # ~30 min on 2 cores (a finished sweep is reused: --fresh-sweep)
    python bench/scale.py --quick     # smoke run: fewer steps, 1 repeat, 4-trial sweep

Scan: the first pass of bench/detect.py's zoo model cnn-clean-0 (built by
`python bench/detect.py`; this bench builds nothing else), its 10 classes in
two chunks of 5 (scan.classes_per_pass=5), so two workers have equal halves.
Four ways, interleaved (every other repeat in reverse order), each repeated
--repeats times, median wall time:
- core, 1 thread: `scan_classes` in this process, torch pinned to 1 thread;
- Ray, 1 worker: the same chunks as Ray tasks (the scan workflow on RayExecutor), Ray
  started in-process with num_cpus=1, each task 1 CPU (1 torch thread);
- core, 2 threads: `scan_classes` with torch on 2 threads;
- Ray, 2 workers: num_cpus=2, two 1-CPU tasks at once.
Speedup = Ray 1 worker / Ray 2 workers. Overhead = Ray / core at the same
CPUs (Ray started and every worker warm beforehand, as on a cluster that
has run before; Ray's start-up is reported apart). Both sides keep freed
tensor memory, as gdm-ray's commands and tasks do by default
(keep_freed_memory, ray.keep_freed_memory; gdm_ray/core/allocator.py). Every run must find the same trigger sizes (checked).

Sweep: `gdm-ray sweep` on bench/attack.py's fm-bw3x3 model (3x3 b/w trigger,
target 0), 8 trials: alpha {0.01, 0.1, 1, 10} x MESA trigger size {3x3, 5x5},
2 trials at a time on the 2 cores; prints the table and the best alpha and
trigger size. Writes bench/results/scale.md (scale-quick.md with --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import ray  # noqa: E402
import torch  # noqa: E402
from report import markdown_table, write_result  # noqa: E402

from gdm_ray.cli.compose import compose_settings  # noqa: E402
from gdm_ray.cli.sweep import sweep  # noqa: E402
from gdm_ray.core.allocator import keep_freed_memory  # noqa: E402
from gdm_ray.core.data import DataSpec, load_splits  # noqa: E402
from gdm_ray.core.executor import ModelBlob  # noqa: E402
from gdm_ray.core.first_pass import ScanConfig, scan_classes  # noqa: E402
from gdm_ray.core.model_io import file_sha256, load_model  # noqa: E402
from gdm_ray.core.scan_workflow import plan_model_scan, run_zoo_scan  # noqa: E402
from gdm_ray.distributed.executor import RayExecutor  # noqa: E402
from gdm_ray.distributed.runtime import RayConfig, init_ray  # noqa: E402
from gdm_ray.store.provenance import code_version  # noqa: E402

MODEL = ROOT / "bench" / "work" / "detect" / "full" / "zoo" / "cnn-clean-0.pt"
SWEEP_MODEL = ROOT / "bench" / "work" / "attack" / "fm-bw3x3" / "model.pt"
WORK = ROOT / "bench" / "work" / "scale"


@ray.remote(num_cpus=1)
def _warm() -> int:
    """Occupy one worker for a moment with gdm-ray and torch imported: the
    timed run then meets warm workers, as on a cluster that has run before."""
    import os

    import gdm_ray.core.scan_workflow  # noqa: F401

    time.sleep(1.0)
    return os.getpid()


def core_scan(model, data, cfg: ScanConfig, threads: int) -> tuple[float, list[float]]:
    torch.set_num_threads(threads)
    scan_classes(model, data, dataclasses.replace(cfg, steps=5), torch.Generator().manual_seed(0))  # warm, like the Ray side
    t0 = time.perf_counter()
    res = scan_classes(model, data, cfg, torch.Generator().manual_seed(0))
    return time.perf_counter() - t0, [c.size for c in res.classes]


def ray_scan(path: Path, sha: str, splits, cfg: ScanConfig) -> tuple[float, list[float]]:
    """The same first pass as Ray tasks (Ray already running): the scan workflow, first pass only."""
    t0 = time.perf_counter()
    blob = ModelBlob(path.stem, str(path), sha, path.read_bytes(), None, splits.shape, splits.eval.num_classes)
    plan = plan_model_scan(splits.defense, path.stem, cfg, None, 0, full_search=False)  # no MESA, no window: the first pass alone
    done = run_zoo_scan(plan, [blob], splits.defense, splits.eval, RayExecutor(RayConfig(task_cpus=1)))
    scan = done.models[path.stem]
    if scan.error:
        raise RuntimeError(scan.error)
    return time.perf_counter() - t0, [c.size for c in scan.result.classes]


def scan_bench(quick: bool, repeats: int) -> tuple[str, list[tuple[bool, str]]]:
    if not MODEL.is_file():
        raise SystemExit(f"{MODEL} is missing: run `python bench/detect.py` first (it builds the zoo)")
    splits = load_splits(DataSpec(name="fashion_mnist"))
    loaded = load_model(MODEL, splits.shape, splits.eval.num_classes)
    sha = file_sha256(MODEL)
    kept = keep_freed_memory()  # what `gdm-ray scan` does at start (keep_freed_memory: true); Ray tasks do it too
    cfg = ScanConfig(steps=60 if quick else 200, classes_per_pass=5)
    times: dict[str, list[float]] = {k: [] for k in ("core1", "ray1", "core2", "ray2")}
    sizes: dict[str, list[float]] = {}
    startup: dict[int, float] = {}

    def ray_run(cpus: int) -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        init_ray(RayConfig(num_cpus=cpus))
        startup[cpus] = time.perf_counter() - t0
        try:
            assert len(set(ray.get([_warm.remote() for _ in range(cpus)]))) == cpus  # every worker started and warm
            ray_scan(MODEL, sha, splits, ScanConfig(steps=5, classes_per_pass=5))
            return ray_scan(MODEL, sha, splits, cfg)
        finally:
            ray.shutdown()

    for rep in range(repeats):
        # odd repeats run everything in reverse order (ABBA), so drift within a
        # repeat (the machine slowing under sustained load) favours no side
        forward = rep % 2 == 0
        for cpus in (1, 2) if forward else (2, 1):
            for kind in ("core", "ray") if forward else ("ray", "core"):
                t, s = core_scan(loaded.module, splits.defense, cfg, cpus) if kind == "core" else ray_run(cpus)
                times[f"{kind}{cpus}"].append(t)
                sizes[f"{kind}{cpus}"] = s
            print(
                f"repeat {rep + 1}/{repeats}, {cpus} CPU(s): core {times[f'core{cpus}'][-1]:.1f}s, Ray {times[f'ray{cpus}'][-1]:.1f}s",
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in times.items()}
    same = all(_close(sizes[k], sizes["core1"]) for k in sizes)

    def paired(a: str, b: str) -> float:
        """Median over repeats of a/b measured side by side (a shared machine's load drifts between repeats)."""
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    speedup = paired("ray1", "ray2")
    over1, over2 = paired("ray1", "core1") - 1, paired("ray2", "core2") - 1
    rows = [
        ["core, 1 thread", "1", f"{med['core1']:.1f}", ", ".join(f"{t:.1f}" for t in times["core1"]), "-"],
        ["Ray, 1 worker (1 CPU)", "1", f"{med['ray1']:.1f}", ", ".join(f"{t:.1f}" for t in times["ray1"]), f"{over1:+.1%}"],
        ["core, 2 threads", "2", f"{med['core2']:.1f}", ", ".join(f"{t:.1f}" for t in times["core2"]), "-"],
        ["Ray, 2 workers (1 CPU each)", "2", f"{med['ray2']:.1f}", ", ".join(f"{t:.1f}" for t in times["ray2"]), f"{over2:+.1%}"],
    ]
    body = "\n\n".join(
        [
            f"Per-class scan (first pass) of `{MODEL.name}`: {splits.eval.num_classes} classes in chunks of "
            f"{cfg.classes_per_pass}, {cfg.steps} steps, batch {cfg.batch_size} per class; "
            f"median of {repeats} interleaved repeats, every other one in reverse order.",
            markdown_table(["run", "CPUs", "median s", "runs (s)", "Ray overhead vs core, same CPUs"], rows),
            "Ratios are medians over the repeats of the ratio within each repeat (runs side by side).",
            f"- speedup, 2 workers vs 1 worker: **{speedup:.2f}x** (per repeat: "
            + ", ".join(f"{x / y:.2f}" for x, y in zip(times["ray1"], times["ray2"]))
            + ")",
            f"- Ray start-up (in-process `ray.init`, not in the times above): {startup[1]:.1f}s at 1 CPU, {startup[2]:.1f}s at 2 CPUs",
            f"- Ray workers' nice value: {RayConfig().worker_niceness} (`ray.worker_niceness`; Ray's own default is 15)",
            f"- every run found the same trigger sizes: {'yes' if same else 'NO'}",
            f"- freed tensor memory kept (keep_freed_memory, core and Ray workers alike): {'yes' if kept else 'no (not glibc)'}",
        ]
    )
    checks = [
        (speedup >= 1.8, f"speedup with 2 workers >= 1.8x ({speedup:.2f}x)"),
        (over1 <= 0.10, f"Ray overhead vs the pure core at 1 CPU <= 10% ({over1:+.1%})"),
        (over2 <= 0.10, f"Ray overhead vs the pure core at 2 CPUs <= 10% ({over2:+.1%})"),
        (same, "Ray and the core find the same trigger sizes"),
    ]
    return body, checks


def _close(a: list[float], b: list[float]) -> bool:
    """Equal up to float noise (thread counts change reduction order)."""
    return len(a) == len(b) and all(abs(x - y) <= 0.05 * max(1.0, abs(y)) for x, y in zip(a, b))


def sweep_bench(quick: bool) -> tuple[str, list[tuple[bool, str]]]:
    if not SWEEP_MODEL.is_file():
        raise SystemExit(f"{SWEEP_MODEL} is missing: run `python bench/attack.py` first")
    out = WORK / ("sweep-quick" if quick else "sweep")
    reused = (out / "sweep.json").is_file()  # a finished sweep only reports
    alphas = [0.01, 1.0] if quick else [0.01, 0.1, 1.0, 10.0]
    space = "{mesa.alpha:{grid:[" + ",".join(map(str, alphas)) + "]},mesa.trigger_size:{grid:[[3,3],[5,5]]}}"
    overrides = [
        f"model={SWEEP_MODEL}",
        "target_class=0",
        f"sweep.space={space}",
        "ray.num_cpus=2",
        "ray.task_cpus=1",
        "progress=false",
        f"out={out}",
    ] + (["mesa.steps=100", "defense.epochs=1"] if quick else [])
    cfg = compose_settings("sweep", overrides)
    t0 = time.perf_counter()
    res = sweep(cfg)
    seconds = time.perf_counter() - t0
    summary = json.loads((Path(res["out"]) / "sweep.json").read_text())
    import pyarrow.parquet as pq

    trials = pq.read_table(res["table"]).to_pylist()

    def f(v, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    rows = sorted(
        (
            [
                f"{t['mesa.alpha']:g}",
                "x".join(map(str, t["mesa.trigger_size"])),
                f(t["asr_after"], ".2%"),
                f(t["acc_drop"], "+.2f"),
                f(t["found_asr_after"], ".2%"),
                f(t["objective"], ".4f"),
                f(t["seconds"], ".0f"),
                t["status"],
            ]
            for t in trials
        ),
        key=lambda r: (float(r[0]), r[1]),
    )
    best = res["best"]
    body = "\n\n".join(
        [
            f"`gdm-ray sweep` on `{SWEEP_MODEL.parent.name}` (bench/attack.py; target 0), {len(trials)} trials, 2 at a time"
            + (
                f", reused: finished earlier by code version {summary.get('code_version', '?')} (`--fresh-sweep` runs it again):"
                if reused
                else f", {seconds:.0f}s in all:"
            ),
            markdown_table(
                ["alpha", "trigger size", "ASR after", "acc drop (points)", "found ASR after", "objective", "s", "status"], rows
            ),
            f"- best (lowest objective = ASR after + accuracy drop / 100): alpha **{best['mesa.alpha']:g}**, "
            f"trigger size **{'x'.join(map(str, best['mesa.trigger_size']))}**",
        ]
    )
    ok = sum(1 for t in trials if t["status"] == "TERMINATED")
    return body, [
        (len(trials) >= (4 if quick else 8) and ok == len(trials), f"sweep of >= {4 if quick else 8} trials finished ({ok}/{len(trials)})")
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--fresh-sweep", action="store_true", help="delete a finished sweep of this bench and run it again")
    args = ap.parse_args()
    code_version()  # fixed now: results record the code that ran, not a commit made while the bench runs
    repeats = args.repeats or (1 if args.quick else 5)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.fresh_sweep:
        shutil.rmtree(WORK / ("sweep-quick" if args.quick else "sweep"), ignore_errors=True)
    body, checks = scan_bench(args.quick, repeats)
    parts = [body]
    if not args.skip_sweep:
        sbody, schecks = sweep_bench(args.quick)
        parts.append(sbody)
        checks += schecks
    parts.append("\n".join(f"- {'met' if ok else 'NOT MET'}: {text}" for ok, text in checks))
    text = "\n\n".join(parts)
    path = write_result("scale-quick" if args.quick else "scale", "Scale: per-class scan on Ray, 1 vs 2 workers; Tune sweep", text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
