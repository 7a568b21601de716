"""How much a clean model's anomaly score moves with the scan's seed alone.

    python bench/clean_spread.py                 # the whole detection zoo, seeds 1 and 2 (~70 min on 2 cores)
    python bench/clean_spread.py --clean-only    # its six clean models alone (~30 min)
    python bench/clean_spread.py --seeds 0 1 2 3

The detection bench (bench/detect.py) judges each model once, with seed 0, and
flags a class whose anomaly index exceeds 2.0. A clean model near that line can
fall on either side of it depending only on the random draws of the search
(initial masks, batch order, MESA's noise). This bench zoo-scans the detection
zoo's six clean models (the same cached models, built by bench/detect.py's
recipe when missing) with other seeds and reports each model's score per seed
and its range: the noise a single scan's false-positive count carries, which a
rerun with other draws must be compared against. zoo-scan judges each class
against the same class in the other models (zoo.calibrate), so a score depends
on the zoo it is scanned in: by default the whole detection zoo is scanned (the
figures then compare with bench/detect.py's); --clean-only scans the six clean
models as a zoo of their own (cheaper; scores lower, not comparable).
Writes bench/results/clean-spread.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from detect import WORK, build, irregular_png, zoo_spec  # noqa: E402
from report import markdown_table, write_result  # noqa: E402

from gdm_ray.cli.compose import compose_settings  # noqa: E402
from gdm_ray.cli.zoo import zoo_scan  # noqa: E402
from gdm_ray.core.data import DataSpec, load_splits  # noqa: E402
from gdm_ray.store.provenance import code_version  # noqa: E402

THRESHOLD = 2.0  # the scan's default anomaly-index threshold (configs: scan.threshold)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="scan seeds (the detection bench uses 0)")
    ap.add_argument("--clean-only", action="store_true", help="scan the clean models as a zoo of their own")
    args = ap.parse_args()
    version = code_version()
    torch.set_num_threads(2)
    work = WORK / "full"
    folder = work / ("clean-zoo" if args.clean_only else "zoo")
    folder.mkdir(parents=True, exist_ok=True)
    splits = load_splits(DataSpec(name="fashion_mnist", limit_train=20000))
    spec = zoo_spec(irregular_png(work / "irregular.png"), quick=False)
    clean = [m for m in spec if not m.backdoors]
    for m in spec if not args.clean_only else clean:
        for suffix in (".pt", ".json"):  # reuse the detection bench's cached model when it is there
            cached, here = work / "zoo" / f"{m.model_id}{suffix}", folder / f"{m.model_id}{suffix}"
            if cached.is_file() and not here.is_file():
                here.write_bytes(cached.read_bytes())
        build(m, splits, folder, quick=False)

    scores: dict[str, dict[int, tuple[float, list[int]]]] = {m.model_id: {} for m in clean}
    for seed in args.seeds:
        out = work / f"clean-spread{'-clean' if args.clean_only else ''}-seed{seed}"
        ids = {m.model_id for m in (clean if args.clean_only else spec)}
        if (out / "zoo.json").is_file() and {v["model_id"] for v in json.loads((out / "zoo.json").read_text())["verdicts"]} != ids:
            raise SystemExit(f"{out} holds a scan of another zoo than {folder}: move it away and run again")
        if not (out / "zoo.json").is_file():
            print(f"zoo-scan, seed={seed}", flush=True)
            cfg = compose_settings("zoo-scan", [f"zoo.path={folder}", f"seed={seed}", "threads=2", "progress=false", f"out={out}"])
            zoo_scan(cfg)
        for v in json.loads((out / "zoo.json").read_text())["verdicts"]:
            if v["model_id"] in scores:
                scores[v["model_id"]][seed] = (v["score"], v["flagged"])

    rows = []
    for mid, by_seed in scores.items():
        vals = [by_seed[s][0] for s in args.seeds]
        rows.append(
            [mid]
            + [f"{by_seed[s][0]:.2f}" + (f" (flags {','.join(map(str, by_seed[s][1]))})" if by_seed[s][1] else "") for s in args.seeds]
            + [f"{min(vals):.2f}-{max(vals):.2f}", f"{max(vals) - min(vals):.2f}"]
        )
    over = sum(1 for by_seed in scores.values() for s in args.seeds if by_seed[s][0] > THRESHOLD)
    runs = len(scores) * len(args.seeds)
    spreads = [max(v[0] for v in b.values()) - min(v[0] for v in b.values()) for b in scores.values()]
    zoo = "the six clean models alone, as a zoo of their own" if args.clean_only else "the whole detection zoo (13 models)"
    body = (
        "Clean models of the detection zoo (bench/detect.py's recipe), scanned by `gdm-ray zoo-scan` at the defaults "
        f"(scan.method=batched) in {zoo}, with each seed; score = the model's max anomaly index, flagged above "
        f"{THRESHOLD}.\n\n"
        + markdown_table(["model"] + [f"seed {s}" for s in args.seeds] + ["range", "spread"], rows)
        + f"\n\n- scans above the threshold (false positives): {over}/{runs}\n"
        f"- largest spread of one model's score across seeds: {max(spreads):.2f} (median {sorted(spreads)[len(spreads) // 2]:.2f})\n"
        f"- zoo scans made by code version {version}\n"
    )
    name = "clean-spread-clean-only" if args.clean_only else "clean-spread"
    print(write_result(name, "Detection: a clean model's score across scan seeds", body))


if __name__ == "__main__":
    main()
