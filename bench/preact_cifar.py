"""Zoo-scan of PreAct-ResNet18 CIFAR-10 models in TrojAI's layout, with the
TrojAI entry point's calibration scored as TrojAI scores it.

    python bench/preact_cifar.py           # ~75 min on 2 cores (zoo cached in bench/work/preact_cifar)
    python bench/preact_cifar.py --quick   # smoke run: 4 tiny models, short scans
    python bench/preact_cifar.py --rescan  # scan the cached zoo again
    python bench/preact_cifar.py --build-only  # train and cache the zoo only (~15 min)

The zoo: one base PreAct-ResNet18 (gdm-ray's standard architecture, the
common implementation's parameter names) trained on 20,000 CIFAR-10 images
with SGD, random crops and flips; every zoo model is that base fine-tuned for
3 epochs with its own seed, clean or with BadNets poisoning (10%) of
bench/detect's trigger kinds: 3x3 b/w and colour patches at random places,
blended noise, an irregular 5x5 shape at a fixed place, two targets at once.
Width 16, a quarter of the standard 64: a first-pass step costs ~16x more at
width 64 (measured 0.7 s vs 2.8 s per training batch of 128 at width 32 vs 64),
which 2 CPU cores cannot give a zoo in a session. Each model lies in its own
folder (id-NNNNNNNN/) as TrojAI ships them: model.safetensors (two as
torch.export model.pt2, so the zoo mixes formats), ground_truth.csv and
clean-example-data/ (200 held-out PNGs, which the scan uses instead of data=).

One `gdm-ray zoo-scan` over the folder at its defaults gives each model's
score, flagged classes and scan time; ROC AUC, false positives and target
classes are judged against bench/detect's targets. The TrojAI calibration
(`gdm-ray trojai configure`'s logistic fit of score to probability) is
scored leave-one-out: each model's probability comes from a fit on the
other models' scores, so no model is judged by a fit that saw it.
Writes bench/results/preact-cifar.md (preact-cifar-quick.md with --quick).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detect import irregular_png, summarise  # noqa: E402
from PIL import Image  # noqa: E402
from report import markdown_table, write_result  # noqa: E402

from gdm_ray.cli.compose import compose_settings  # noqa: E402
from gdm_ray.cli.trojai import cross_entropy, fit_calibration, probability  # noqa: E402
from gdm_ray.cli.zoo import zoo_scan  # noqa: E402
from gdm_ray.core.attack import BadNets  # noqa: E402
from gdm_ray.core.data import DataSpec, load_splits  # noqa: E402
from gdm_ray.core.metrics import attack_success_rate, clean_accuracy  # noqa: E402
from gdm_ray.core.model_io import save_safetensors  # noqa: E402
from gdm_ray.core.program import save_program  # noqa: E402
from gdm_ray.core.standard_models import Normalized, PreActResNet18  # noqa: E402
from gdm_ray.core.train import TrainConfig, train_classifier  # noqa: E402
from gdm_ray.core.triggers import TriggerSpec, make_trigger  # noqa: E402
from gdm_ray.store.provenance import code_version  # noqa: E402

WORK = ROOT / "bench" / "work" / "preact_cifar"
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10" / "cifar10-jpg.tar.gz"
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
WIDTH = 16
EXAMPLES = 200  # clean-example-data per model (zoo.min_examples is 100)


@dataclass
class ZooModel:
    model_id: str
    seed: int
    backdoors: list[tuple[dict, int]] = field(default_factory=list)  # (TriggerSpec fields, target)
    label: str = "clean"
    fmt: str = "safetensors"  # or pt2


def zoo_spec(png: Path, quick: bool) -> list[ZooModel]:
    irregular = {"family": "png", "path": str(png), "placement": "fixed", "row": 24, "col": 3}
    zoo = [
        ZooModel("id-00000000", 0),
        ZooModel("id-00000001", 1, fmt="pt2"),
        ZooModel("id-00000002", 2),
        ZooModel("id-00000003", 3),
        ZooModel("id-00000004", 10, [({"family": "bw3x3", "number": 341}, 0)], "3x3 b/w, random place"),
        ZooModel("id-00000005", 11, [({"family": "color3x3", "seed": 1}, 3)], "3x3 colour, random place", fmt="pt2"),
        ZooModel("id-00000006", 12, [({"family": "blend", "blend": 0.15, "seed": 0, "placement": "fixed"}, 7)], "blended noise 0.15"),
        ZooModel("id-00000007", 13, [(irregular, 2)], "irregular PNG 5x5, fixed (24, 3)"),
        ZooModel(
            "id-00000008",
            14,
            [({"family": "bw3x3", "number": 186}, 1), ({"family": "bw3x3", "number": 455}, 6)],
            "two targets: two 3x3 b/w patches",
        ),
    ]
    if quick:
        keep = {"id-00000000", "id-00000001", "id-00000004", "id-00000007"}
        zoo = [m for m in zoo if m.model_id in keep]
    return zoo


def _train_cfg(epochs: float, lr: float) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=128, lr=lr, momentum=0.9, weight_decay=5e-4, crop_pad=4, flip=True)


def build_base(splits, path: Path, quick: bool) -> tuple[torch.nn.Module, dict]:
    """The clean base every zoo model is fine-tuned from (cached as safetensors)."""
    card_path = path.with_suffix(".json")
    model = Normalized(PreActResNet18(3, 10, width=WIDTH), MEAN, STD)
    if path.is_file() and card_path.is_file():
        from safetensors.torch import load_file

        model.net.load_state_dict(load_file(str(path)))
        return model.eval(), json.loads(card_path.read_text())
    torch.manual_seed(100)
    t0 = time.perf_counter()
    epochs = 1 if quick else 8
    train_classifier(model, splits.train, _train_cfg(epochs, 0.1), torch.Generator().manual_seed(100), progress=None)
    card = {"epochs": epochs, "images": len(splits.train), "clean_accuracy": clean_accuracy(model.eval(), splits.eval),
            "train_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    save_safetensors(model, path, "preact_resnet18", (3, 32, 32), 10)
    card_path.write_text(json.dumps(card, indent=2))
    print(f"  built the base: acc {card['clean_accuracy']:.2%}, {card['train_seconds']:.0f}s", flush=True)
    return model, card


def build(m: ZooModel, base: torch.nn.Module, splits, zoo: Path, cards: Path, quick: bool) -> dict:
    """Fine-tune one zoo model from the base into zoo/<id>/ (cached: an existing folder and card are reused)."""
    folder, card_path = zoo / m.model_id, cards / f"{m.model_id}.json"
    if card_path.is_file() and any(folder.glob("model.*")):
        return json.loads(card_path.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    attacks = [BadNets(make_trigger(TriggerSpec(**spec), 3, (32, 32)), target, 0.1) for spec, target in m.backdoors]

    def hook(x, y, g):
        for a in attacks:
            x, y = a.poison_batch(x, y, g)
        return x, y

    torch.manual_seed(m.seed)
    model = copy.deepcopy(base).train()
    epochs = 1 if quick else 3 * (2 if len(attacks) > 1 else 1)  # two backdoors share the poisoned rows: more epochs
    t0 = time.perf_counter()
    train_classifier(model, splits.train, _train_cfg(epochs, 0.02), torch.Generator().manual_seed(m.seed), hook if attacks else None)
    seconds = time.perf_counter() - t0
    model.eval()
    asr = [attack_success_rate(model, splits.eval, a.trigger, a.target, torch.Generator().manual_seed(1)) for a in attacks]
    (folder / "clean-example-data").mkdir(parents=True)
    (folder / "ground_truth.csv").write_text(f"{int(bool(attacks))}\n")
    # each model its own clean examples: a different slice of the defender's images
    g = torch.Generator().manual_seed(1000 + m.seed)
    idx = torch.randperm(len(splits.defense), generator=g)[:EXAMPLES]
    for j, i in enumerate(idx.tolist()):
        img = (splits.defense.x[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(img, "RGB").save(folder / "clean-example-data" / f"class_{int(splits.defense.y[i])}_example_{j}.png")
    if m.fmt == "pt2":
        save_program(model, folder / "model.pt2", (3, 32, 32), {"arch": "preact_resnet18"})
    else:
        save_safetensors(model, folder / "model.safetensors", "preact_resnet18", (3, 32, 32), 10)
    card = {
        "model_id": m.model_id,
        "seed": m.seed,
        "label": m.label,
        "format": m.fmt,
        "targets": [t for _, t in m.backdoors],
        "clean_accuracy": clean_accuracy(model, splits.eval),
        "asr": asr,
        "train_seconds": round(seconds, 1),
    }
    card_path.write_text(json.dumps(card, indent=2))
    print(
        f"  built {m.model_id} ({m.label}): acc {card['clean_accuracy']:.2%}, ASR {[f'{a:.1%}' for a in asr]}, {seconds:.0f}s", flush=True
    )
    return card


def loo_probabilities(scores: list[float], labels: list[int]) -> list[float]:
    """Each model's probability from a calibration fitted on the others (nan where the others hold one label only)."""
    out = []
    for i in range(len(scores)):
        s, t = scores[:i] + scores[i + 1 :], labels[:i] + labels[i + 1 :]
        out.append(probability(scores[i], fit_calibration(s, t)) if len(set(t)) == 2 else float("nan"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rescan", action="store_true", help="scan the zoo again even when a finished scan of it exists")
    ap.add_argument("--build-only", action="store_true", help="build (and cache) the zoo, scan nothing")
    args = ap.parse_args()
    code_version()
    quick = args.quick
    work = WORK / ("quick" if quick else "full")
    zoo, cards_dir = work / "zoo", work / "cards"
    zoo.mkdir(parents=True, exist_ok=True)
    cards_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    splits = load_splits(DataSpec(name="cifar10", path=str(CIFAR), limit_train=2000 if quick else 20000, limit_eval=500 if quick else 2000))
    png = irregular_png(work / "irregular.png")
    print(f"building the zoo in {zoo}", flush=True)
    base, base_card = build_base(splits, work / "base.safetensors", quick)
    cards = {m.model_id: build(m, base, splits, zoo, cards_dir, quick) for m in zoo_spec(png, quick)}
    if args.build_only:
        return

    out = work / "zoo-scan"
    fast = ["scan.steps=60", "mesa.steps=60"] if quick else []
    if (out / "zoo.json").is_file() and not args.rescan:
        print(f"zoo-scan: reusing {out}", flush=True)
        verdicts = {v["model_id"]: v for v in json.loads((out / "zoo.json").read_text())["verdicts"]}
    else:
        shutil.rmtree(out, ignore_errors=True)
        # data= is the fallback only: every model brings its own clean-example-data
        cfg = compose_settings(
            "zoo-scan", [f"zoo.path={zoo}", "data=cifar10", f"data.path={CIFAR}", "threads=2", "progress=false", f"out={out}", *fast]
        )
        verdicts = {v["model_id"]: v for v in zoo_scan(cfg)["verdicts"]}

    ids = sorted(cards)
    scores = [float(verdicts[i]["score"]) for i in ids]
    labels = [int(bool(cards[i]["targets"])) for i in ids]
    loo = loo_probabilities(scores, labels)
    fit = fit_calibration(scores, labels)
    in_sample = [probability(s, fit) for s in scores]
    ce_loo, ce_fit = cross_entropy(loo, labels), cross_entropy(in_sample, labels)
    ce_half = cross_entropy([0.5] * len(labels), labels)

    per_model = []
    for i, p in zip(ids, loo):
        c, v = cards[i], verdicts[i]
        per_model.append([
            i, c["format"], c["label"], ",".join(map(str, c["targets"])) or "-", f"{c['clean_accuracy']:.2%}",
            ", ".join(f"{a:.1%}" for a in c["asr"]) or "-", str(v.get("examples", "-")), f"{v['score']:.2f}",
            ",".join(map(str, v["flagged"])) or "-", f"{v['seconds']:.0f}", f"{p:.3f}",
        ])  # fmt: skip
    row, s = summarise("gdm-ray zoo-scan (defaults)", verdicts, cards)
    secs = [float(verdicts[i]["seconds"]) for i in ids]
    checks = [
        (s["auc"] >= 0.95, f"ROC AUC of the score >= 0.95 ({s['auc']:.3f})"),
        (s["top_right"] == s["detected"], f"every detected target class right ({s['top_right']}/{s['detected']})"),
        (s["fp"] <= 1, f"at most 1 false positive on clean models ({s['fp']}/{s['negatives']})"),
        (ce_loo < ce_half, f"leave-one-out calibrated cross-entropy below the coin's ln 2 ({ce_loo:.3f} vs {ce_half:.3f})"),
    ]
    weak = [i for i in ids if cards[i]["asr"] and min(cards[i]["asr"]) < 0.9]
    body = "\n\n".join(
        [
            f"Base: PreAct-ResNet18 width {WIDTH}, {base_card['epochs']} epochs on {base_card['images']} images, "
            f"clean accuracy {base_card['clean_accuracy']:.2%}. Zoo models: the base fine-tuned with their own seeds "
            f"(clean accuracy and ASR on {len(splits.eval)} CIFAR-10 test images).",
            "Per model (score = max anomaly index; flagged = classes above the threshold; s = that model's scan; "
            "examples = the images the scan used; p = leave-one-out calibrated probability of a backdoor):",
            markdown_table(
                ["model", "format", "backdoor", "true targets", "clean acc", "ASR", "examples", "score", "flagged", "s", "p"], per_model
            ),  # fmt: skip
            "Summary:",
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
                [row],
            ),  # fmt: skip
            f"Scan time per model: median {statistics.median(secs):.0f} s, range {min(secs):.0f}-{max(secs):.0f} s.",
            "TrojAI calibration (logistic score -> probability, as `gdm-ray trojai configure` fits it): "
            f"cross-entropy leave-one-out {ce_loo:.3f}, fitted on all {len(ids)} models {ce_fit:.3f} "
            f"(a = {fit['a']:.3f}, b = {fit['b']:.3f}), always-0.5 {ce_half:.3f}.",
            *([f"Backdoors that did not fully take (ASR < 90%): {', '.join(weak)}."] if weak else []),
            "Zoo scan made by code version(s): " + ", ".join(sorted({v["code_version"] for v in verdicts.values()})) + ".",
            "\n".join(f"- {'met' if ok else 'NOT MET'}: {text}" for ok, text in checks),
        ]
    )
    title = "Detection on PreAct-ResNet18 CIFAR-10 models in TrojAI's layout"
    path = write_result("preact-cifar-quick" if quick else "preact-cifar", title, body)
    print(body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
