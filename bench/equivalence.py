"""Do two checkouts give the same figures? Runs the same small jobs of every
command in each and compares what they wrote (a refactor's behaviour check).

    python bench/equivalence.py --before /tmp/base        # a clone at the older commit
    python bench/equivalence.py --before DIR --quick      # attack, scan and defend only

Each checkout runs from its own tree (PYTHONPATH and its configs/), with this
venv, on synthetic data (8 classes, 16x16): attack (one backdoored and two
clean models), evaluate, search (baseline), scan (one process, and as Ray
tasks), zoo-scan (one process, and on in-process Ray), defend for a given
class and with target_class=auto, and a 2-trial sweep. Both sides scan and
repair the models the *before* checkout trained, so the later steps compare
like with like. Every number written to metrics.json, search.json, model.json
and the Parquet tables is compared exactly; run-specific values (seconds,
paths, hashes of configs and code, times) are left out. The command keys that
a checkout renamed (attack.target -> attack.target_class, evaluate's target
-> target_class) are given in each checkout's spelling, and a file's key
``target`` is compared as ``target_class``.
Writes bench/results/equivalence.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from report import markdown_table, write_result  # noqa: E402

DATA = ["data=synthetic", "data.num_classes=8", "data.samples=3000", "progress=false", "threads=1"]
SCAN = ["scan.steps=150", "scan.classes_per_pass=4", "mesa.steps=100", "mesa.eval_samples=128", "samples_per_level=4"]
DEFEND = ["mesa.steps=100", "mesa.eval_samples=128", "defense.epochs=1", "samples_per_level=4"]
# values that differ from run to run, or name where and when, not what
# keys a checkout renamed: compared under the new name
RENAMED = {"target": "target_class"}
SKIP = re.compile(
    r"seconds|hash|code_version|path|created|^out$|^model$|uri|sha256|node|timestamp|finished_at|trial_id|"
    r"^location$|^experiment|^source|^init$|^zoo$|^repaired_model$|^run$|^date"
)


def renamed(tree: Path) -> bool:
    """Whether this checkout spells the target class target_class in attack and evaluate."""
    return (tree / "gdm_ray" / "cli" / "settings.py").is_file()


def gdm(tree: Path, args: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree), "GDM_RAY_CONFIG_DIR": str(tree / "configs")}
    with open(log, "a") as f:
        f.write(f"$ gdm-ray {' '.join(args)}\n")
        f.flush()
        code = subprocess.run([sys.executable, "-m", "gdm_ray.cli.main", *args], cwd=tree, env=env, stdout=f, stderr=f).returncode
    if code != 0:
        raise SystemExit(f"{tree}: gdm-ray {args[0]} failed ({code}); see {log}")


def jobs(tree: Path, work: Path, models: Path, quick: bool) -> list[tuple[str, list[str], list[str]]]:
    """(name, args, files to compare) of every job; models= are the before side's."""
    target = "attack.target_class" if renamed(tree) else "attack.target"
    eval_target = "target_class" if renamed(tree) else "target"
    bd = models / "backdoored" / "model.pt"
    zoo = models / "zoo"
    out = [
        (
            "attack",
            ["attack", *DATA, "train=tiny", "arch.width=8", "train.epochs=5", f"{target}=2", "attack.rate=0.2", f"out={work / 'attack'}"],
            ["model.json"],
        ),
        ("scan", ["scan", f"model={bd}", *DATA, *SCAN, f"out={work / 'scan'}"], ["verdict.parquet", "classes.parquet"]),
        ("defend", ["defend", f"model={bd}", "target_class=2", *DATA, *DEFEND, f"out={work / 'defend'}"], ["metrics.json"]),
    ]
    if quick:
        return out
    return out + [
        ("evaluate", ["evaluate", f"model={bd}", *DATA, "trigger=bw3x3", f"{eval_target}=2", f"out={work / 'evaluate'}"], ["metrics.json"]),
        (
            "search baseline",
            ["search", f"model={bd}", "target_class=2", "method=baseline", "baseline.steps=100", *DATA, f"out={work / 'search'}"],
            ["search.json"],
        ),
        (
            "scan on Ray",
            ["scan", f"model={bd}", *DATA, *SCAN, "use_ray=true", "ray.num_cpus=2", f"out={work / 'scan-ray'}"],
            ["verdict.parquet", "classes.parquet"],
        ),
        (
            "zoo-scan",
            ["zoo-scan", f"zoo.path={zoo}", *DATA, *SCAN, "use_ray=false", f"out={work / 'zoo'}"],
            ["verdicts.parquet", "classes.parquet"],
        ),
        (
            "zoo-scan on Ray",
            ["zoo-scan", f"zoo.path={zoo}", *DATA, *SCAN, "use_ray=true", "ray.num_cpus=2", f"out={work / 'zoo-ray'}"],
            ["verdicts.parquet", "classes.parquet"],
        ),
        (
            "defend auto",
            ["defend", f"model={bd}", "target_class=auto", *DATA, *SCAN, "defense.epochs=1", f"out={work / 'defend-auto'}"],
            ["metrics.json"],
        ),
        # sweep had no threads key before the run keys were shared; its trials pin their own threads
        (
            "sweep",
            [
                "sweep",
                f"model={bd}",
                "target_class=2",
                *(d for d in DATA if not d.startswith("threads=")),
                "mesa.steps=60",
                "mesa.eval_samples=64",
                "defense.epochs=1",
                "ray.num_cpus=2",
                "sweep.space={mesa.alpha:{grid:[0.01,0.1]}}",
                f"out={work / 'sweep'}",
            ],
            ["trials.parquet"],
        ),
    ]


def make_models(tree: Path, models: Path, log: Path) -> None:
    """The backdoored model and a zoo of it and two clean ones, trained by one checkout."""
    target = "attack.target_class" if renamed(tree) else "attack.target"
    zoo = models / "zoo"
    zoo.mkdir(parents=True, exist_ok=True)
    for name, rate, seed in (("backdoored", 0.2, 0), ("clean-1", 0.0, 1), ("clean-2", 0.0, 2)):
        gdm(
            tree,
            [
                "attack",
                *DATA,
                "train=tiny",
                "arch.width=8",
                "train.epochs=5",
                f"{target}=2",
                f"attack.rate={rate}",
                f"seed={seed}",
                f"out={models / name}",
            ],
            log,
        )
        for suffix in (".pt", ".json"):
            (zoo / f"{name}{suffix}").write_bytes((models / name / f"model{suffix}").read_bytes())


def figures(path: Path) -> Any:
    """What a file says, less the run-specific values."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        value: Any = pq.read_table(path).to_pylist()
    else:
        value = json.loads(path.read_text())
    return _strip(value)


def _strip(v: Any) -> Any:
    if isinstance(v, dict):
        v = {RENAMED.get(k, k): x for k, x in v.items() if not (k in RENAMED and RENAMED[k] in v)}  # a card with both: the new one
        return {k: _strip(x) for k, x in sorted(v.items()) if not SKIP.search(str(k))}
    if isinstance(v, list):
        return [_strip(x) for x in v]
    return v


def diff(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two figures differ (first few)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in {'before' if k in a else 'after'}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += diff(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and (a == b or (math.isnan(a) and math.isnan(b))):
        return []
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="the other checkout (e.g. a clone at the older commit)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "equivalence")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    before, after = args.before.resolve(), ROOT
    work = args.work.resolve()
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    log = work / "log.txt"
    models = work / "models"
    make_models(before, models, log)
    rows, t0 = [], time.perf_counter()
    for (name, a_args, files), (_, b_args, _) in zip(
        jobs(before, work / "before", models, args.quick), jobs(after, work / "after", models, args.quick)
    ):
        gdm(before, a_args, log)
        gdm(after, b_args, log)
        out_a, out_b = Path(a_args[-1].split("=", 1)[1]), Path(b_args[-1].split("=", 1)[1])
        for f in files:
            d = diff(figures(out_a / f), figures(out_b / f))
            rows.append([name, f, "identical" if not d else f"DIFFERENT ({len(d)}): " + "; ".join(d[:3])])
            print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=before).stdout.strip()
    body = (
        f"Before: {before} at {commit}; after: this checkout. {time.perf_counter() - t0:.0f} s.\n\n"
        + markdown_table(["job", "file", "figures"], rows)
        + "\n"
    )
    name = "equivalence-quick" if args.quick else "equivalence"
    print(body)
    print(f"wrote {write_result(name, 'Same jobs, two checkouts: do the figures agree?', body)}")


if __name__ == "__main__":
    main()
