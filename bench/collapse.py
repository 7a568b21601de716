"""Collapsed staircase levels and what fixes them (issue 19, part 2).

    python bench/collapse.py                  # 3 third-party models, 5 strategies, seed 0 (about an hour on 2 cores)
    python bench/collapse.py --seeds 0 1 2    # more draws: collapse is a matter of chance
    python bench/collapse.py --quick          # smoke run: the quick zoo, short searches, small splits

A MESA level collapses when its generator learns one trigger: its entropy
estimate (MINE's mutual information, nats) ends near 0 while its samples meet
beta_i, and MESA degenerates into the one-trigger baseline. gdm-ray detects
that (entropy below mesa.collapse_entropy with ASR >= beta_i) and trains the
collapsed levels again. This bench measures which remedy works, each a
`gdm-ray defend method=mesa` run at the defaults, told the target class,
on models gdm-ray did not make (bench/thirdparty.py's; noise, checkerboard
and bar triggers, where a search can settle on one point):

- none: no restart (mesa.restarts=0), the collapse left as it is;
- re-initialise: a fresh start of the collapsed levels, same alpha
  (mesa.restart_alpha=1);
- alpha x10: a fresh start with ten times the entropy weight (the default);
- noise_dim 40: four times the generators' noise dimensions from the start,
  no restart (a collapsed generator ignores its noise; more of it to use);
- alpha 1: ten times the entropy weight for every level from the start, no
  restart (the global remedy the per-level one is measured against).

A restart only runs where a level collapsed, and it draws nothing before
that test, so where "none" collapsed no level, "re-initialise" and
"alpha x10" are the same run by construction and are not run again.

Per run: each level's final entropy, ASR and restart; the levels still
collapsed; the real trigger's ASR after the repair and the clean-accuracy
loss, measured by bench/thirdparty.py's own code on gdm-ray's eval split;
the search's seconds. Finished runs are reused from --work.
Writes bench/results/collapse.md (collapse-quick.md with --quick).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import thirdparty  # noqa: E402
from report import markdown_table, write_result  # noqa: E402
from robust import DATA, QUICK  # noqa: E402

from gdm_ray.cli.compose import compose_settings  # noqa: E402
from gdm_ray.cli.search import defend  # noqa: E402
from gdm_ray.core.mesa import MESAConfig  # noqa: E402
from gdm_ray.core.model_io import load_model  # noqa: E402
from gdm_ray.store.provenance import code_version  # noqa: E402

WORK = ROOT / "bench" / "work" / "collapse"
MODELS = ["fm-lenet-noise5-fixed", "fm-preact-bar2x7-random", "c10-vgg-noise3-random"]
# (label, mesa overrides, is it a restart strategy (same run as "none" where nothing collapsed)?)
STRATEGIES = [
    ("none", ["mesa.restarts=0"], False),
    ("re-initialise", ["mesa.restarts=1", "mesa.restart_alpha=1"], True),
    ("alpha x10 (default)", ["mesa.restarts=1", "mesa.restart_alpha=10"], True),
    ("noise_dim 40", ["mesa.restarts=0", "mesa.noise_dim=40"], False),
    ("alpha 1", ["mesa.restarts=0", "mesa.alpha=1.0"], False),
]
COLLAPSE = MESAConfig.collapse_entropy  # the default threshold: the same test the search applies


def collapsed(search: dict) -> list[int]:
    """Levels whose final entropy is below the threshold while their ASR meets beta."""
    return [i for i, (e, a, b) in enumerate(zip(search["entropy"], search["level_asr"], search["betas"])) if e < COLLAPSE and a >= b]


def run(spec: thirdparty.ModelSpec, model: Path, over: list[str], seed: int, out: Path, quick: bool) -> dict:
    """One defend run (reused when finished) and the real trigger's ASR measured independently."""
    row_file = out / "row.json"
    if row_file.is_file():
        return json.loads(row_file.read_text())
    shutil.rmtree(out, ignore_errors=True)
    args = [f"model={model}", f"target_class={spec.target}", "method=mesa", f"seed={seed}", f"out={out}", "progress=false"]
    t0 = time.perf_counter()
    m = defend(compose_settings("defend", [*args, *DATA[spec.data], *(QUICK if quick else []), *over]))
    seconds = time.perf_counter() - t0
    _, eval_set = thirdparty.load_data(spec.data)
    trig = thirdparty.make_poison_trigger(spec, eval_set.shape[0], eval_set.shape[1:])
    repaired = load_model(out / (m.get("repaired_model") or "model.pt"), eval_set.shape, eval_set.num_classes).module
    s = m["search"]
    row = {
        "entropy": s["entropy"],
        "level_asr": s["level_asr"],
        "betas": s["betas"],
        "restarted": s.get("restarted") or [0] * len(s["entropy"]),
        "collapsed": collapsed(s),
        "asr_after": thirdparty.measure_asr(repaired, eval_set, trig, spec.target, seed=1),
        "acc_after": thirdparty.measure_accuracy(repaired, eval_set),
        "search_seconds": s.get("search_seconds"),
        "seconds": round(seconds, 1),
        "code_version": code_version(),
    }
    row_file.write_text(json.dumps(row, indent=1) + "\n")
    return row


def levels_cell(r: dict) -> str:
    """Each level's entropy (nats) / ASR, R where it restarted, * where it is still collapsed."""
    marks = [
        f"{e:.2f}/{a:.0%}" + ("R" if rs else "") + ("*" if i in r["collapsed"] else "")
        for i, (e, a, rs) in enumerate(zip(r["entropy"], r["level_asr"], r["restarted"]))
    ]
    return " ".join(marks)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", help="zoo models by name")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    version = code_version()
    work = args.work or WORK / ("quick" if args.quick else "full")
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    specs = thirdparty.zoo_spec(args.quick)
    names = args.only or ([s.name for s in specs if s.trigger is not None][:2] if args.quick else MODELS)
    specs = [s for s in specs if s.name in names]
    folder = thirdparty.zoo_folder(args.quick)
    cards = {s.name: c for s, c, _ in thirdparty.build_all(specs, folder)}

    rows, per = [], {label: [] for label, _, _ in STRATEGIES}
    for spec in specs:
        card = cards[spec.name]
        for seed in args.seeds:
            base = None
            for label, over, is_restart in STRATEGIES:
                if is_restart and base is not None and not base["collapsed"]:  # "none" never restarts
                    r = {**base, "same_as_none": True}
                else:
                    slug = label.split(" (")[0].replace(" ", "-")
                    print(f"{spec.name} seed {seed}: {label}", flush=True)
                    r = run(spec, folder / f"{spec.name}.pt", over, seed, work / spec.name / f"seed{seed}" / slug, args.quick)
                if label == "none":
                    base = r
                per[label].append((r, card))
                rows.append(
                    [
                        spec.name,
                        str(seed),
                        label,
                        levels_cell(r) + (" (as none)" if r.get("same_as_none") else ""),
                        f"{len(r['collapsed'])}",
                        f"{card['asr']:.2%} -> {r['asr_after']:.2%}",
                        f"{100 * (card['clean_accuracy'] - r['acc_after']):+.2f}",
                        "-" if r.get("search_seconds") is None else f"{r['search_seconds']:.0f}",
                    ]
                )
    summary = []
    for label, runs in per.items():
        n_levels = sum(len(r["entropy"]) for r, _ in runs)
        summary.append(
            [
                label,
                f"{sum(len(r['collapsed']) for r, _ in runs)}/{n_levels}",
                f"{sum(1 for r, _ in runs if any(r['restarted']))}/{len(runs)}",
                f"{statistics.median(r['asr_after'] for r, _ in runs):.2%}",
                f"{max(r['asr_after'] for r, _ in runs):.2%}",
                f"{max(100 * (c['clean_accuracy'] - r['acc_after']) for r, c in runs):+.2f}",
            ]
        )
    body = "\n".join(
        [
            f"`gdm-ray defend method=mesa` at the defaults, told the target class, with each strategy's overrides; seeds {args.seeds}."
            f" Levels: entropy (nats) / ASR per level, R = restarted, * = still collapsed (entropy < {COLLAPSE} with ASR >= beta)."
            " ASR of the real trigger and clean-accuracy loss (points) measured by bench/thirdparty.py's code on gdm-ray's eval split."
            ' A restart strategy where "none" collapsed nothing is the same run ("as none").',
            "",
            markdown_table(["model", "seed", "strategy", "levels", "collapsed", "ASR before -> after", "acc loss", "search s"], rows),
            "",
            markdown_table(
                ["strategy", "levels collapsed at the end", "runs that restarted", "ASR after: median", "worst", "worst acc loss"],
                summary,
            ),
            "",
            "- Strategies: " + "; ".join(f"{label}: {' '.join(over)}" for label, over, _ in STRATEGIES),
            f"- Runs made by code version {version}.",
        ]
    )
    path = write_result("collapse-quick" if args.quick else "collapse", "Collapsed levels: which remedy works", body)
    print(body)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
