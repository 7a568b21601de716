"""How many clean examples of its own a model needs before zoo-scan trusts them.

    python bench/min_examples.py                     # ~30 min on 2 shared cores
    python bench/min_examples.py --sizes 24 48 96 --draws 2 --steps 150

zoo-scan scans a model on its own example folder (TrojAI's
``clean-example-data/``) when it has one with at least ``zoo.min_examples``
images, else on the shared ``data=`` set. This bench measures what a small
own set does to the first pass's anomaly score: five synthetic 8-class models
(16x16; three clean, two with a BadNets backdoor on class 2, made by
``gdm-ray attack``) are scanned on random draws of N clean images taken apart
from the shared set, and scored both ways the zoo scores them: within the
model (``reference=model``) and against the other four models scanned on the
shared 600-image set (``reference=zoo``, what a zoo of >= 3 models uses).
Reported per N: the clean models' highest score and how many of their scans
are flagged (false positives), and the backdoored models' lowest score and
how many are flagged (true positives). Writes bench/results/min-examples.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from report import markdown_table, write_result  # noqa: E402

from gdm_ray.cli.main import main as gdm  # noqa: E402
from gdm_ray.core.data import DataSpec, load_splits  # noqa: E402
from gdm_ray.core.first_pass import ScanConfig, anomaly_index, reference_anomaly, rescore, scan_classes  # noqa: E402
from gdm_ray.core.model_io import load_model  # noqa: E402

WORK = ROOT / "bench" / "work" / "min-examples"
DATA = ["data=synthetic", "data.num_classes=8", "data.samples=3000", "progress=false", "threads=1"]
MODELS = {"clean-0": (0.0, 0), "clean-1": (0.0, 1), "clean-2": (0.0, 2), "bd-0": (0.2, 0), "bd-1": (0.2, 1)}


def build(name: str, rate: float, seed: int) -> Path:
    out = WORK / name
    if not (out / "model.pt").is_file():
        args = ["attack", *DATA, "train=tiny", "arch.width=8", "train.epochs=5", "attack.target_class=2"]
        assert gdm([*args, f"attack.rate={rate}", f"seed={seed}", f"out={out}"]) == 0
    return out / "model.pt"


@dataclass
class Scored:
    score: float  # within the model
    flagged: bool
    zoo_score: float  # against the other four models on the shared set
    zoo_flagged: bool
    valid: int  # classes whose found trigger reached scan.valid_asr on the held-out images
    target: bool  # the backdoor's class 2 among the zoo-judged flags


def _row(n: int, c: list[Scored], b: list[Scored]) -> list[str]:
    def frac(xs: list[bool]) -> str:
        return f"{sum(xs)}/{len(xs)}"

    return [
        str(n),
        f"{max(v.score for v in c):.2f}",
        frac([v.flagged for v in c]),
        f"{max(v.zoo_score for v in c):.2f}",
        frac([v.zoo_flagged for v in c]),
        frac([v.valid < 4 for v in c]),
        f"{min(v.score for v in b):.2f}",
        frac([v.flagged for v in b]),
        f"{min(v.zoo_score for v in b):.2f}",
        frac([v.zoo_flagged for v in b]),
        frac([v.target for v in b]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 24, 32, 48, 64, 96, 128, 200])
    ap.add_argument("--draws", type=int, default=4, help="random example sets per size")
    ap.add_argument("--steps", type=int, default=300, help="scan.steps (zoo-scan's default: 300)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the machine is shared: two threads spin-wait on each other
    splits = load_splits(DataSpec(name="synthetic", num_classes=8, samples=3000))
    cfg = ScanConfig(steps=args.steps)
    nets = {m: load_model(build(m, *spec)).module for m, spec in MODELS.items()}
    rng = lambda: torch.Generator().manual_seed(0)  # noqa: E731  zoo-scan's seed
    shared = {m: [c.size for c in scan_classes(net, splits.defense, cfg, rng()).classes] for m, net in nets.items()}
    pool = splits.eval  # the own examples: clean images the shared set (splits.defense) does not hold
    rows = []
    for n in args.sizes:
        got: dict[str, list[Scored]] = {"clean": [], "bd": []}
        for d in range(args.draws):
            own = pool.subset(torch.randperm(len(pool), generator=torch.Generator().manual_seed(1000 * n + d))[:n])
            for m, net in nets.items():
                r = scan_classes(net, own, cfg, rng())
                zoo = rescore(r, reference_anomaly([[c.size for c in r.classes], *(s for o, s in shared.items() if o != m)])[0])
                valid = sum(c.valid for c in r.classes)
                got[m.split("-")[0]].append(Scored(r.score, r.backdoored, zoo.score, zoo.backdoored, valid, 2 in zoo.flagged))
                print(f"N={n} draw {d} {m}: score {r.score:.2f} (zoo {zoo.score:.2f}), {valid} classes valid", flush=True)
        rows.append(_row(n, got["clean"], got["bd"]))
    header = ["N own", "clean max (model)", "clean flagged", "clean max (zoo)", "clean flagged (zoo)",
              "clean: scans with < half the classes valid", "bd min (model)", "bd flagged", "bd min (zoo)",
              "bd flagged (zoo)", "bd: class 2 flagged (zoo)"]  # fmt: skip
    within = {m: f"{max(anomaly_index(shared[m])):.2f}" for m in MODELS}
    body = (
        f"scan.steps={args.steps}, threshold 2.0, {args.draws} draws per N; clean: 3 models, bd: 2 models (target 2).\n"
        f"On the shared set (600 images) the models score {', '.join(f'{m} {v}' for m, v in within.items())} (within).\n"
        "A class whose trigger reaches scan.valid_asr on fewer held-out images (the first N/5) counts at the whole image's size.\n\n"
        + markdown_table(header, rows)
    )
    print(body)
    print(write_result("min-examples", "Own clean examples: anomaly score against the number of examples", body))


if __name__ == "__main__":
    main()
