"""What each accuracy-keeping ingredient of a repair buys (issue 19, part 3).

    python bench/ingredients.py                # 5 third-party models, every variant (about an hour on 2 cores)
    python bench/ingredients.py --quick        # smoke run: the quick zoo's models, short searches
    python bench/ingredients.py --only fm-vgg-ring7-fixed

A repair retrains the model it did not train with a recipe that is not the
model's own, and on third-party models that has cost 1.8-2.4 points of clean
accuracy. This bench holds the search fixed and changes only the
retraining: per model (bench/thirdparty.py's, made with their own recipes and
poisoning), one `gdm-ray defend method=mesa` run at the defaults, told the
target class, finds the trigger ensemble; then the core repair retrains the
model against that same ensemble under each variant of the defense settings:

- defaults: configs as shipped (the retraining rate probed first: core/lr_probe.py);
- no lr probe: the defaults before the probe (defense.lr used as configured),
  and a stricter probe (defense.lr_probe_tolerance=0.02);
- distillation from the original model on the image before its trigger
  (defense.distill=1, temperature 2);
- BatchNorm statistics kept as the model came (defense.batchnorm=frozen);
- the stopping epoch chosen on 10% of the clean images held out
  (defense.holdout=0.1; core/selection.py);
- a lower learning rate (defense.lr=0.003) and a smaller triggered share
  (defense.rate=0.2), the two knobs a recipe mismatch would suggest;
- distillation + frozen BatchNorm + holdout together;
- plain fine-tuning (no triggers, the same budget) at the defaults: the control.

Figures on gdm-ray's eval split, measured by bench/thirdparty.py's own code:
ASR of the real trigger and clean-accuracy loss against the model as it came.
Finished retrainings are reused from --work (resume); --fresh starts over.
Writes bench/results/ingredients.md (ingredients-quick.md with --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import thirdparty  # noqa: E402
from report import markdown_table, write_result  # noqa: E402

from gdm_ray.cli.common import load_data  # noqa: E402
from gdm_ray.cli.compose import compose_settings  # noqa: E402
from gdm_ray.cli.search import defend  # noqa: E402
from gdm_ray.core.ensemble import load_ensemble  # noqa: E402
from gdm_ray.core.metrics import EVAL_SEED_OFFSET  # noqa: E402
from gdm_ray.core.model_io import load_model  # noqa: E402
from gdm_ray.core.repair import repair  # noqa: E402
from gdm_ray.store.provenance import code_version  # noqa: E402

WORK = ROOT / "bench" / "work" / "ingredients"
DATA = {"fashion_mnist": ["data=fashion_mnist"], "cifar10": ["data=cifar10", f"data.path={thirdparty.CIFAR}"]}
QUICK = ["data.limit_defense=1000", "data.limit_eval=1000", "mesa.steps=200", "mesa.extent_steps=100", "defense.epochs=1"]
# three architectures (BatchNorm or not), three recipes, both data sets, 3x3 to 8x8, fixed and random places
MODELS = ["fm-lenet-noise5-fixed", "fm-vgg-ring7-fixed", "fm-preact-bar2x7-random", "c10-preact-blend", "c10-vgg-checker8-fixed"]
# (label, defense overrides, retrain against the found triggers?)
VARIANTS = [
    ("defaults", {}, True),
    ("no lr probe", {"lr_probe_steps": 0}, True),
    ("probe tolerance 0.02", {"lr_probe_tolerance": 0.02}, True),
    ("distill", {"distill": 1.0}, True),
    ("BN frozen", {"batchnorm": "frozen"}, True),
    ("holdout 0.1", {"holdout": 0.1}, True),
    ("lr 0.003", {"lr": 0.003}, True),
    ("rate 0.2", {"rate": 0.2}, True),
    ("distill + BN frozen + holdout", {"distill": 1.0, "batchnorm": "frozen", "holdout": 0.1}, True),
    ("rate 0.1", {"rate": 0.1}, True),
    ("append 0.5", {"mix": "append"}, True),
    ("append 0.2", {"mix": "append", "rate": 0.2}, True),
    ("append 0.2 + distill", {"mix": "append", "rate": 0.2, "distill": 1.0}, True),
    ("rate 0.2 + epochs 1", {"rate": 0.2, "epochs": 1}, True),
    ("rate 0.05", {"rate": 0.05}, True),
    ("rate 0.1 + distill", {"rate": 0.1, "distill": 1.0}, True),
    ("rate 0.1 + lr 0.003", {"rate": 0.1, "lr": 0.003}, True),
    ("fine-tune (control)", {}, False),
]


def search(spec: thirdparty.ModelSpec, model: Path, out: Path, quick: bool, extra: list[str] | None = None) -> dict:
    """The one MESA search of a model (`defend` at the defaults, target known); reused when finished."""
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    over = [f"model={model}", f"target_class={spec.target}", "method=mesa", f"out={out}", "progress=false", *DATA[spec.data]]
    return defend(compose_settings("defend", [*over, *(QUICK if quick else []), *(extra or [])]))


def variant(spec: thirdparty.ModelSpec, model: Path, found: Path, label: str, over: dict, triggers: bool, out: Path, quick: bool) -> dict:
    """One retraining of ``model`` against the ensemble in ``found`` (none for the control), measured independently."""
    f = out / (label.replace(" ", "-").replace("+", "and").replace("(", "").replace(")", "") + ".json")
    if f.is_file():
        return json.loads(f.read_text())
    s = compose_settings("defend", [f"model={model}", f"target_class={spec.target}", *DATA[spec.data], *(QUICK if quick else [])])
    cfg = dataclasses.replace(s.defense, **over)
    splits = load_data(s.data)
    net = load_model(model, splits.shape, splits.eval.num_classes).module
    samplers = {spec.target: load_ensemble(found / "ensemble")} if triggers else {}
    fixed = repair(
        net, splits.defense, splits.eval, samplers, cfg, torch.Generator().manual_seed(0), EVAL_SEED_OFFSET,
        measure_before=False, finetune=not triggers,
    )  # fmt: skip
    _, eval_set = thirdparty.load_data(spec.data)
    trig = thirdparty.make_poison_trigger(spec, eval_set.shape[0], eval_set.shape[1:])
    row = {
        "asr": thirdparty.measure_asr(fixed.repaired, eval_set, trig, spec.target, seed=1),
        "accuracy": thirdparty.measure_accuracy(fixed.repaired, eval_set),
        "target_accuracy": thirdparty.measure_accuracy(fixed.repaired, eval_set.subset(eval_set.y == spec.target)),
        "selection": fixed.selection,
        "lr_probe": fixed.lr_probe,
        "seconds": round(fixed.retrain_seconds, 1),
        "defense": dataclasses.asdict(cfg),
        "code_version": code_version(),
    }
    out.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(row, indent=1) + "\n")
    print(f"  {spec.name} {label}: ASR {row['asr']:.2%}, acc {row['accuracy']:.2%}, {row['seconds']:.0f}s", flush=True)
    return row


def _target_accuracy(spec: thirdparty.ModelSpec, model: Path) -> float:
    """The model's accuracy, as it came, on the eval images of its target class."""
    _, eval_set = thirdparty.load_data(spec.data)
    net = load_model(model, eval_set.shape, eval_set.num_classes).module
    return thirdparty.measure_accuracy(net, eval_set.subset(eval_set.y == spec.target))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the quick zoo, short searches, small splits")
    ap.add_argument("--only", nargs="*", help="zoo models by name")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--dev", action="store_true", help="thirdparty.dev_spec()'s models (the ones settings are chosen on)")
    ap.add_argument("--variants", nargs="+", help="only these variants, by label")
    ap.add_argument("--name", default=None, help="the result's file name under bench/results (default from the options)")
    ap.add_argument("--search", nargs="+", default=[], help="overrides of each model's search (mesa.mask_l1=0.3); with its own --work")
    args = ap.parse_args()
    code_version()  # fixed now: results record the code that ran
    work = args.work or WORK / ("quick" if args.quick else "dev" if args.dev else "full")
    if args.fresh and work.exists():
        shutil.rmtree(work)
    variants = [v for v in VARIANTS if not args.variants or v[0] in args.variants]
    if args.variants and len(variants) != len(args.variants):
        ap.error(f"no such variant among: {'; '.join(v[0] for v in VARIANTS)}")
    specs = thirdparty.dev_spec() if args.dev else thirdparty.zoo_spec(args.quick)
    default = [s.name for s in specs if s.trigger is not None]
    names = args.only or (default[:2] if args.quick else default if args.dev else MODELS)
    refs = {s.clean_ref for s in specs if s.name in names}
    specs = [s for s in specs if s.name in names or s.name in refs]
    folder = thirdparty.zoo_folder(args.quick)
    built = {s.name: card for s, card, _ in thirdparty.build_all(specs, folder)}
    rows, drops, asrs, tdrops = [], {v[0]: [] for v in variants}, {v[0]: [] for v in variants}, {v[0]: [] for v in variants}
    for spec in [s for s in specs if s.trigger is not None]:
        card, model = built[spec.name], folder / f"{spec.name}.pt"
        print(f"{spec.name}: search", flush=True)
        found = work / spec.name / "search"
        search(spec, model, found, args.quick, args.search)
        row = [spec.name, thirdparty._describe(spec), f"{card['asr']:.2%}", f"{card['clean_accuracy']:.2%}"]
        target_before = None
        for label, over, triggers in variants:
            r = variant(spec, model, found, label, over, triggers, work / spec.name, args.quick)
            drop = 100 * (card["clean_accuracy"] - r["accuracy"])
            drops[label].append(drop)
            if r.get("target_accuracy") is not None:
                if target_before is None:
                    target_before = _target_accuracy(spec, model)
                tdrops[label].append(100 * (target_before - r["target_accuracy"]))
            asrs[label].append(r["asr"])
            chosen = (r.get("selection") or {}).get("chosen_epoch")
            probe = r.get("lr_probe")
            lowered = probe is not None and probe["lr"] != probe["trials"][0]["lr"]
            cell = f"{r['asr']:.2%} / {drop:+.2f}" + (f" (epoch {chosen})" if chosen else "")
            row.append(cell + (f" (lr {probe['lr']:.3g})" if lowered else ""))
        rows.append(row)
    summary = [
        [label, f"{statistics.median(drops[label]):+.2f}", f"{max(drops[label]):+.2f}", f"{statistics.median(asrs[label]):.2%}",
         f"{max(asrs[label]):.2%}", f"{statistics.median(tdrops[label]):+.2f}" if tdrops[label] else "-"]
        for label, _, _ in variants
    ]  # fmt: skip
    body = "\n".join(
        [
            f"One MESA search per model (`defend` at the defaults{', ' + ' '.join(args.search) if args.search else ''}, target known);"
            " then the same ensemble retrains the"
            " model under each variant of the defense settings (seed 0). Cell: ASR of the real trigger after / clean-"
            "accuracy loss in points (negative: a gain), measured by bench/thirdparty.py's code on gdm-ray's eval split;"
            " holdout variants name the epoch they kept; (lr x): the rate probe (core/lr_probe.py) lowered defense.lr to x.",
            "",
            markdown_table(["model", "trigger", "ASR before", "acc before", *[v[0] for v in variants]], rows),
            "",
            markdown_table(
                ["variant", "acc loss: median (pts)", "worst", "ASR after: median", "worst", "target-class acc loss: median"], summary
            ),
            "",
            "- Variants: " + "; ".join(f"{label}: {over or 'the defaults'}" for label, over, _ in variants),
        ]
    )
    name = "ingredients-quick" if args.quick else "ingredients-dev" if args.dev else "ingredients"
    if args.search:  # another search: another table
        name += "-" + "-".join(o.replace("mesa.", "").replace("=", "") for o in args.search)
    path = write_result(args.name or name, "Repair ingredients: what keeps clean accuracy", body)
    print(body)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
