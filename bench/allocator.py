"""Allocator bench: what keep_freed_memory (gdm_ray/core/allocator.py) does to
a CPU search. One chunk of 5 classes of bench/detect.py's zoo model
cnn-clean-0 (built by `python bench/detect.py`), searched in a fresh process
each time, as a command or a new Ray worker meets it: glibc's default malloc
against freed memory kept, at 1 and 2 torch threads, interleaved (every other
repeat in reverse order). Each process warms up with a 3-step search, then
times two searches; the table gives their wall time, minor page faults and
the process's peak RSS.

    python bench/allocator.py            # ~8 min on 2 cores
    python bench/allocator.py --quick    # smoke run: 20 steps, 1 repeat

Writes bench/results/allocator.md (allocator-quick.md with --quick).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from report import markdown_table, write_result  # noqa: E402

MODEL = ROOT / "bench" / "work" / "detect" / "full" / "zoo" / "cnn-clean-0.pt"
VARIANTS = ("default", "kept")


def child(steps: int, threads: int, keep: bool) -> None:
    """One fresh process: warm up, then time two searches of chunk 0."""
    import torch

    from gdm_ray.core.allocator import keep_freed_memory
    from gdm_ray.core.data import DataSpec, load_splits
    from gdm_ray.core.first_pass import ScanConfig, plan_scan, scan_chunks
    from gdm_ray.core.model_io import load_model

    torch.set_num_threads(threads)
    if keep and not keep_freed_memory():
        raise SystemExit("keep_freed_memory does not apply here (not glibc)")
    splits = load_splits(DataSpec(name="fashion_mnist"))
    net = load_model(MODEL, splits.shape, splits.eval.num_classes).module
    cfg = ScanConfig(steps=steps, classes_per_pass=5)
    plan = plan_scan(splits.defense, cfg, torch.Generator().manual_seed(0))
    scan_chunks(net, splits.defense, ScanConfig(steps=3, classes_per_pass=5), plan, [0])
    runs = []
    for _ in range(2):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        scan_chunks(net, splits.defense, cfg, plan, [0])
        runs.append([time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0])
    print(json.dumps({"runs": runs, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def spawn(steps: int, threads: int, keep: bool) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(steps), str(threads), "1" if keep else "0"], capture_output=True, text=True, cwd=ROOT
    )
    if out.returncode:
        raise SystemExit(f"child failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        steps, threads, keep = args.child
        return child(steps, threads, bool(keep))
    if not MODEL.is_file():
        raise SystemExit(f"{MODEL} is missing: run `python bench/detect.py` first (it builds the zoo)")
    steps, repeats = (20, 1) if args.quick else (60, args.repeats or 5)
    res: dict[tuple[int, str], list[dict]] = {(t, v): [] for t in (1, 2) for v in VARIANTS}
    for rep in range(repeats):
        order = [(t, v) for t in (1, 2) for v in VARIANTS]
        for t, v in order if rep % 2 == 0 else order[::-1]:
            res[(t, v)].append(spawn(steps, t, v == "kept"))
        print(
            f"repeat {rep + 1}/{repeats}: "
            + ", ".join(f"{t} thr {v} {res[(t, v)][-1]['runs'][0][0]:.2f}s" for t in (1, 2) for v in VARIANTS),
            flush=True,
        )
    rows, checks = [], []
    for t in (1, 2):
        for v in VARIANTS:
            times = [r[0] for p in res[(t, v)] for r in p["runs"]]
            faults = [r[1] for p in res[(t, v)] for r in p["runs"]]
            ratio = "-" if v == "default" else f"{_paired(res[(t, 'kept')], res[(t, 'default')]):.3f}"
            rows.append(
                [
                    v,
                    str(t),
                    f"{statistics.median(times):.2f}",
                    f"{min(times):.2f}-{max(times):.2f}",
                    f"{(max(times) - min(times)) / statistics.median(times):.0%}",
                    f"{statistics.median(faults) / 1000:.0f}k",
                    f"{statistics.median(p['rss_mb'] for p in res[(t, v)]):.0f}",
                    ratio,
                ]
            )
        kept_vs = _paired(res[(t, "kept")], res[(t, "default")])
        checks.append((kept_vs < 1.0, f"freed memory kept is faster at {t} thread(s) (time ratio {kept_vs:.3f})"))
    body = "\n\n".join(
        [
            f"One chunk (5 classes, {steps} steps, batch 32 per class) of `{MODEL.name}`'s first pass, in a fresh process each time; "
            f"{repeats} interleaved repeats, every other one in reverse order; each process times two searches after a 3-step warm-up.",
            markdown_table(
                [
                    "malloc",
                    "threads",
                    "median s",
                    "range s",
                    "spread",
                    "minor faults per search (median)",
                    "peak RSS MB",
                    "time ratio kept / default (median, same repeat)",
                ],
                rows,
            ),
            "Spread: (max - min) / median over every timed search. default: glibc's own settings; kept: "
            "`keep_freed_memory()` (no mmap, trim above 1 GiB), what every gdm-ray command and Ray task does unless told not to.",
            "\n".join(f"- {'met' if ok else 'NOT MET'}: {text}" for ok, text in checks),
        ]
    )
    path = write_result("allocator-quick" if args.quick else "allocator", "Allocator: freed tensor memory kept vs glibc's default", body)
    print(body)
    print(f"wrote {path}")


def _paired(a: list[dict], b: list[dict]) -> float:
    """Median over repeats and both timed searches of a's time over b's."""
    return statistics.median(x[0] / y[0] for pa, pb in zip(a, b) for x, y in zip(pa["runs"], pb["runs"]))


if __name__ == "__main__":
    main()
