"""Detection bench: zoo-scan a Fashion-MNIST model zoo with gdm-ray's scan and
with a baseline-only scan, then repair the fixed-location irregular trigger.

    python bench/detect.py            # ~50 min on 2 cores (zoo cached in bench/work/detect/zoo)
    python bench/detect.py --quick    # smoke run: 4 models, short training and scans
    python bench/detect.py --rescan   # redo the zoo scans and repairs too (finished ones of the cached zoo are reused)

The zoo: clean and backdoored models over two architectures (the small CNN
and a ResNet-9 of width 8), each trained from scratch with its own seed on
20,000 training images for 3 epochs. Backdoors: 3x3 black-white and colour
patches at random locations, blended full-image noise, an irregular shape
(an RGBA PNG whose alpha is the mask) at a fixed location, and a model with
two targets. Each model is a TorchScript file with a card (<id>.json) beside it.

Both scans go through `gdm-ray zoo-scan` on the same folder in this run:
- gdm-ray scan (scan.method=batched, the default): the batched first pass
  over all classes, then MESA on each flagged class (zoo-scan's budget);
- baseline-only scan (scan.method=baseline): the pixel-space baseline
  (PixelBaseline, Neural Cleanse with a fixed lambda) one class at a time,
  same steps, batch and anomaly index, no MESA.
Then `gdm-ray defend target_class=auto scan.moving_window=true` on each
irregular-trigger model measures the real trigger's ASR after the repair,
twice: judging the model's classes against each other alone (natural triggers
get flagged and repaired too), and against the zoo just scanned
(reference=zoo-scan folder; the model itself is left out of the reference);
and plain fine-tuning with the same data and budget (method=finetune, the
control a repair must beat). Beside ASR and clean accuracy: BackdoorBench's
robust accuracy (R-Acc) and DER.
Writes bench/results/detect.md (detect-quick.md with --quick).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from report import markdown_table, write_result  # noqa: E402

from gdm_ray.cli.compose import compose_settings  # noqa: E402
from gdm_ray.cli.search import defend  # noqa: E402
from gdm_ray.cli.zoo import zoo_scan  # noqa: E402
from gdm_ray.core.attack import BadNets  # noqa: E402
from gdm_ray.core.data import DataSpec, load_splits  # noqa: E402
from gdm_ray.core.metrics import attack_success_rate, clean_accuracy  # noqa: E402
from gdm_ray.core.model_io import save_torchscript  # noqa: E402
from gdm_ray.core.models import build_model  # noqa: E402
from gdm_ray.core.train import TrainConfig, train_classifier  # noqa: E402
from gdm_ray.core.triggers import TriggerSpec, make_trigger  # noqa: E402
from gdm_ray.store.provenance import code_version  # noqa: E402

WORK = ROOT / "bench" / "work" / "detect"
WIDTH = {"small_cnn": 32, "resnet9": 8}


@dataclass
class ZooModel:
    model_id: str
    arch: str
    seed: int
    backdoors: list[tuple[dict, int]] = field(default_factory=list)  # (TriggerSpec fields, target)
    label: str = "clean"


def irregular_png(path: Path) -> Path:
    """A 5x5 irregular shape (an arrow-like glyph) as RGBA: white strokes,
    alpha 1 on the shape and 0 elsewhere."""
    from PIL import Image

    shape = np.array([[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 0, 1, 0, 1], [0, 0, 1, 0, 0], [0, 1, 1, 0, 0]], dtype=np.uint8)
    rgba = np.zeros((5, 5, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = shape * 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def zoo_spec(png: Path, quick: bool) -> list[ZooModel]:
    irregular = {"family": "png", "path": str(png), "placement": "fixed", "row": 20, "col": 3}
    zoo = [
        ZooModel("cnn-clean-0", "small_cnn", 0),
        ZooModel("cnn-clean-1", "small_cnn", 1),
        ZooModel("cnn-clean-2", "small_cnn", 2),
        ZooModel("res-clean-0", "resnet9", 0),
        ZooModel("res-clean-1", "resnet9", 1),
        ZooModel("res-clean-2", "resnet9", 2),
        ZooModel("cnn-bw3x3-t0", "small_cnn", 10, [({"family": "bw3x3", "number": 341}, 0)], "3x3 b/w, random location"),
        ZooModel("res-color3x3-t3", "resnet9", 11, [({"family": "color3x3", "seed": 1}, 3)], "3x3 colour, random location"),
        ZooModel(
            "cnn-blend-t7",
            "small_cnn",
            12,
            [({"family": "blend", "blend": 0.15, "seed": 0, "placement": "fixed"}, 7)],
            "blended noise 0.15",
        ),
        ZooModel(
            "res-blend-t5", "resnet9", 13, [({"family": "blend", "blend": 0.15, "seed": 3, "placement": "fixed"}, 5)], "blended noise 0.15"
        ),
        ZooModel("cnn-irregular-t2", "small_cnn", 14, [(irregular, 2)], "irregular PNG 5x5, fixed (20, 3)"),
        ZooModel("res-irregular-t9", "resnet9", 15, [(irregular, 9)], "irregular PNG 5x5, fixed (20, 3)"),
        ZooModel(
            "cnn-two-t1-t6",
            "small_cnn",
            16,
            [({"family": "bw3x3", "number": 186}, 1), ({"family": "bw3x3", "number": 455}, 6)],
            "two targets: two 3x3 b/w patches",
        ),
    ]
    if quick:
        keep = {"cnn-clean-0", "res-clean-0", "cnn-bw3x3-t0", "cnn-irregular-t2"}
        zoo = [m for m in zoo if m.model_id in keep]
    return zoo


def build(m: ZooModel, splits, folder: Path, quick: bool) -> dict:
    """Train one zoo model (cached: an existing model and card are reused)."""
    path, card_path = folder / f"{m.model_id}.pt", folder / f"{m.model_id}.json"
    if path.is_file() and card_path.is_file():
        return json.loads(card_path.read_text())
    c, h, w = splits.shape
    attacks = [BadNets(make_trigger(TriggerSpec(**spec), c, (h, w)), target, 0.1) for spec, target in m.backdoors]

    def hook(x, y, g):
        for a in attacks:
            x, y = a.poison_batch(x, y, g)
        return x, y

    torch.manual_seed(m.seed)
    model = build_model(m.arch, c, splits.train.num_classes, WIDTH[m.arch])
    # two backdoors share the poisoned share of each batch's attention: they need more epochs to both take
    epochs = (1 if quick else 3) * (2 if len(attacks) > 1 else 1)
    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=0.05)
    t0 = time.perf_counter()
    train_classifier(model, splits.train, cfg, torch.Generator().manual_seed(m.seed), hook if attacks else None)
    seconds = time.perf_counter() - t0
    model.eval()
    asr = [attack_success_rate(model, splits.eval, a.trigger, a.target, torch.Generator().manual_seed(1)) for a in attacks]
    card = {
        "model_id": m.model_id,
        "arch": m.arch,
        "width": WIDTH[m.arch],
        "seed": m.seed,
        "label": m.label,
        "targets": [t for _, t in m.backdoors],
        "backdoors": [{"trigger": s, "target": t} for s, t in m.backdoors],
        "clean_accuracy": clean_accuracy(model, splits.eval),
        "asr": asr,
        "train_seconds": round(seconds, 1),
    }
    if len(m.backdoors) == 1:  # the card defend reads to measure the real trigger (one trigger per card)
        card.update(trigger=asdict(TriggerSpec(**m.backdoors[0][0])), target=m.backdoors[0][1])
    save_torchscript(model, path, (c, h, w), {"arch": m.arch})
    card_path.write_text(json.dumps(card, indent=2))
    print(f"  built {m.model_id}: acc {card['clean_accuracy']:.2%}, ASR {[f'{a:.1%}' for a in asr]}, {seconds:.0f}s", flush=True)
    return card


# how each repair of the irregular-trigger models judges classes (finetune: the control, no search)
REPAIR_MODES = {
    "alone": "the model's own classes",
    "zoo": "the zoo (reference=zoo-scan)",
    "finetune": "none: plain fine-tuning, no triggers (control)",
}


def roc_auc(pos: list[float], neg: list[float]) -> float:
    """P(score of a backdoored model > score of a clean one), ties count half."""
    if not pos or not neg:
        return float("nan")
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def summarise(name: str, verdicts: dict[str, dict], cards: dict[str, dict]) -> tuple[list[str], dict]:
    pos = [verdicts[i]["score"] for i, c in cards.items() if c["targets"]]
    neg = [verdicts[i]["score"] for i, c in cards.items() if not c["targets"]]
    right = sum(1 for i, c in cards.items() if bool(verdicts[i]["backdoored"]) == bool(c["targets"]))
    detected = [i for i, c in cards.items() if c["targets"] and verdicts[i]["backdoored"]]
    top_right = sum(1 for i in detected if verdicts[i]["target_class"] in cards[i]["targets"])
    all_found = sum(1 for i in detected if set(cards[i]["targets"]) <= set(verdicts[i]["flagged"]))
    fp = sum(1 for i, c in cards.items() if not c["targets"] and verdicts[i]["backdoored"])
    secs = [verdicts[i]["seconds"] for i in cards]
    s = {
        "auc": roc_auc(pos, neg),
        "accuracy": right / len(cards),
        "detected": len(detected),
        "positives": len(pos),
        "top_right": top_right,
        "all_found": all_found,
        "fp": fp,
        "negatives": len(neg),
        "median_seconds": statistics.median(secs),
    }
    row = [
        name,
        f"{s['auc']:.3f}",
        f"{right}/{len(cards)} ({s['accuracy']:.0%})",
        f"{len(detected)}/{len(pos)}",
        f"{top_right}/{len(detected)}",
        f"{all_found}/{len(detected)}",
        f"{fp}/{len(neg)}",
        f"{s['median_seconds']:.1f}",
    ]
    return row, s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rescan", action="store_true", help="scan the zoo again even when a finished scan of it exists")
    args = ap.parse_args()
    code_version()  # fixed now: results record the code that ran, not a commit made while the bench runs
    quick = args.quick
    work = WORK / ("quick" if quick else "full")
    folder = work / "zoo"
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    splits = load_splits(DataSpec(name="fashion_mnist", limit_train=6000 if quick else 20000))
    png = irregular_png(work / "irregular.png")
    print(f"building the zoo in {folder}", flush=True)
    cards = {m.model_id: build(m, splits, folder, quick) for m in zoo_spec(png, quick)}

    fast = ["scan.steps=100", "mesa.steps=100"] if quick else []
    verdicts = {}
    for method in ("batched", "baseline"):
        out = work / f"zoo-scan-{method}"
        cfg = compose_settings(
            "zoo-scan", [f"zoo.path={folder}", f"scan.method={method}", "threads=2", "progress=false", f"out={out}", *fast]
        )
        if (out / "zoo.json").is_file() and not args.rescan:  # a finished scan of this zoo is reused
            print(f"zoo-scan, scan.method={method}: reusing {out}", flush=True)
            verdicts[method] = {v["model_id"]: v for v in json.loads((out / "zoo.json").read_text())["verdicts"]}
            continue
        print(f"zoo-scan, scan.method={method}", flush=True)
        verdicts[method] = {v["model_id"]: v for v in zoo_scan(cfg)["verdicts"]}

    # defend target_class=auto on each irregular-trigger model: scan, map the
    # heat, model, retrain; once judging the model's classes against each other
    # alone, once against the zoo scanned above (reference=)
    repairs = []
    for mid in [i for i in cards if "irregular" in i][: 1 if quick else 2]:
        modes = (("alone", []), ("zoo", [f"reference={work / 'zoo-scan-batched'}"]), ("finetune", ["method=finetune"]))
        for mode, extra in modes:
            out = work / f"defend-{mid}" if mode == "alone" else work / f"defend-{mid}-{mode}"
            if (out / "metrics.json").is_file() and not args.rescan:  # a finished repair of this zoo model is reused
                print(f"defend {mid} ({mode}): reusing {out}", flush=True)
                repairs.append((mid, mode, json.loads((out / "metrics.json").read_text())))
                continue
            shutil.rmtree(out, ignore_errors=True)
            cfg = compose_settings(
                "defend",
                [
                    f"model={folder / (mid + '.pt')}",
                    "target_class=auto",
                    "scan.moving_window=true",
                    "threads=2",
                    "progress=false",
                    f"out={out}",
                    *fast,
                    *extra,
                ],
            )
            repairs.append((mid, mode, defend(cfg)))

    per_model = []
    for mid, c in cards.items():
        b, n = verdicts["batched"][mid], verdicts["baseline"][mid]
        per_model.append(
            [
                mid,
                c["arch"],
                c["label"],
                ",".join(map(str, c["targets"])) or "-",
                f"{c['clean_accuracy']:.2%}",
                ", ".join(f"{a:.1%}" for a in c["asr"]) or "-",
                f"{b['score']:.2f}",
                ",".join(map(str, b["flagged"])) or "-",
                f"{b['seconds']:.0f}",
                f"{n['score']:.2f}",
                ",".join(map(str, n["flagged"])) or "-",
                f"{n['seconds']:.0f}",
            ]
        )
    rows, stats = [], {}
    for name, key in (
        ("gdm-ray scan (batched first pass + MESA on flagged)", "batched"),
        ("baseline-only scan (PixelBaseline per class)", "baseline"),
    ):
        row, stats[key] = summarise(name, verdicts[key], cards)
        rows.append(row)
    ratios = [verdicts["batched"][i]["seconds"] / verdicts["baseline"][i]["seconds"] for i in cards]
    ratio = statistics.median(ratios)
    repair_rows = []
    for mid, mode, m in repairs:
        before, after = m["before"], m["after"] or {}
        fraction = lambda d, k: "-" if d.get(k) is None else f"{d[k]:.2%}"  # noqa: E731
        repair_rows.append(
            [
                mid,
                REPAIR_MODES[mode],
                ",".join(map(str, m["targets"])) or "-",
                fraction(before, "asr"),
                fraction(after, "asr"),
                fraction(before, "clean_accuracy"),
                fraction(after, "clean_accuracy"),
                fraction(before, "robust_accuracy"),
                fraction(after, "robust_accuracy"),
                "-" if m.get("der") is None else f"{m['der']:.3f}",
            ]
        )

    g, base = stats["batched"], stats["baseline"]
    checks = [
        (g["auc"] >= 0.95, f"ROC AUC of the score >= 0.95 ({g['auc']:.3f})"),
        (g["top_right"] == g["detected"], f"every detected target class right ({g['top_right']}/{g['detected']})"),
        (g["fp"] <= 1, f"at most 1 false positive on clean models ({g['fp']}/{g['negatives']})"),
        (
            ratio <= 2.0,
            f"scan time per model <= 2x the baseline-only scan (median ratio {ratio:.2f}; "
            f"{g['median_seconds']:.0f}s vs {base['median_seconds']:.0f}s)",
        ),
    ]
    by = {(mid, mode): m for mid, mode, m in repairs}
    for mid, mode, m in repairs:
        asr = (m["after"] or {}).get("asr")
        if mode == "finetune":  # the control: the repairs must leave less ASR than it
            ft = "-" if asr is None else f"{asr:.2%}"
            left = {o: (by[(mid, o)]["after"] or by[(mid, o)]["before"])["asr"] for o in ("alone", "zoo")}  # nothing repaired: as before
            worse = [o for o, v in left.items() if asr is not None and v >= asr]
            text = f"{mid}: both repairs leave less ASR than plain fine-tuning ({ft}); not on: {', '.join(worse) or 'none'}"
            checks.append((not worse, text))
            continue
        how = "alone" if mode == "alone" else "reference=zoo-scan"
        checks.append(
            (
                asr is not None and asr <= 0.05,
                f"{mid}: ASR after defend target_class=auto ({how}) <= 5% ({'-' if asr is None else f'{asr:.2%}'})",
            )
        )
    body = "\n\n".join(
        [
            "Per model (score = max anomaly index; flagged = classes above the threshold; seconds = that model's scan):",
            markdown_table(
                [
                    "model",
                    "arch",
                    "backdoor",
                    "true targets",
                    "clean acc",
                    "ASR",
                    "gdm-ray score",
                    "flagged",
                    "s",
                    "baseline score",
                    "flagged",
                    "s",
                ],
                per_model,
            ),
            "Summary (same zoo, same run):",
            markdown_table(
                [
                    "scan",
                    "ROC AUC",
                    "verdict accuracy",
                    "backdoored detected",
                    "top target right",
                    "all targets reported",
                    "false positives",
                    "median s/model",
                ],
                rows,
            ),
            f"Scan time, gdm-ray / baseline-only, per model: median {ratio:.2f} (range {min(ratios):.2f}-{max(ratios):.2f}).",
            "Zoo scans made by code version(s): "
            + ", ".join(sorted({v["code_version"] for m in verdicts.values() for v in m.values()}))
            + ".",
            "`defend target_class=auto scan.moving_window=true` on the fixed-location irregular trigger:",
            "Repairs made by code version(s): " + ", ".join(sorted({m["code_version"] for _, _, m in repairs})) + ".",
            markdown_table(
                [
                    "model",
                    "classes judged against",
                    "repaired targets",
                    "ASR before",
                    "ASR after",
                    "acc before",
                    "acc after",
                    "R-Acc before",
                    "R-Acc after",
                    "DER",
                ],
                repair_rows,
            ),
            "\n".join(f"- {'met' if ok else 'NOT MET'}: {text}" for ok, text in checks),
        ]
    )
    path = write_result("detect-quick" if quick else "detect", "Detection: zoo-scan of a Fashion-MNIST model zoo", body)
    print(body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
