"""Backdoor attack bench: clean vs backdoored accuracy and ASR per trigger.

    python bench/attack.py                 # Fashion-MNIST and CIFAR-10 (~25 min on 2 cores)
    python bench/attack.py --only fashion_mnist
    python bench/attack.py --quick         # smoke run on small subsets (~2 min)

Fashion-MNIST: a clean small CNN and one backdoored model per trigger, all
trained from scratch the same way (experiment/attack_fashion_mnist).
CIFAR-10: a clean ResNet-9 (width 16) from scratch, then each backdoor by
fine-tuning that clean model on poisoned data (experiment/attack_cifar10_*).
Every model runs through the same code path as `gdm-ray attack`. Writes
bench/results/attack.md (bench/results/attack-quick.md with --quick).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from report import markdown_table, write_result  # noqa: E402

from gdm_ray.cli.attack import attack  # noqa: E402
from gdm_ray.cli.compose import compose_settings  # noqa: E402

CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10" / "cifar10-jpg.tar.gz"

# (label, trigger overrides, target class)
FMNIST_TRIGGERS = [
    ("3x3 black-white #341, random location", ["trigger=bw3x3", "trigger.number=341"], 0),
    ("3x3 colour, random location", ["trigger=color3x3", "trigger.seed=1"], 3),
    ("blended noise (alpha 0.15), full image", ["trigger=blend"], 7),
]
CIFAR_TRIGGERS = [
    ("3x3 black-white #341, random location", ["trigger=bw3x3", "trigger.number=341"], 0),
    ("3x3 colour, random location", ["trigger=color3x3", "trigger.seed=1"], 3),
    ("5x5 noise block, bottom-right", ["trigger=block_noise", "trigger.size=[5,5]"], 8),
]


def run(overrides: list[str], out: Path) -> dict:
    cfg = compose_settings("attack", [*overrides, f"out={out}", "progress=false"])
    return attack(cfg)


def bench_fashion_mnist(work: Path, quick: bool) -> list[list[str]]:
    base = ["+experiment=attack_fashion_mnist"]
    if quick:
        base += ["data.limit_train=6000", "train.epochs=2"]
    clean = run([*base, "attack.rate=0"], work / "fm-clean")
    rows = []
    for label, trig, target in FMNIST_TRIGGERS:
        r = run([*base, *trig, f"attack.target_class={target}"], work / f"fm-{trig[0].split('=')[1]}")
        drop = 100 * (clean["clean_accuracy"] - r["clean_accuracy"])
        ok = r["asr"] >= 0.97 and drop <= 1.5
        rows.append(
            [
                "Fashion-MNIST",
                label,
                str(target),
                "scratch",
                f"{clean['clean_accuracy']:.2%}",
                f"{r['clean_accuracy']:.2%}",
                f"{drop:+.2f}",
                f"{r['asr']:.2%}",
                f"{r['train_seconds']:.0f}",
                "yes" if ok else "NO",
            ]
        )
        print(rows[-1], flush=True)
    return rows, clean


def bench_cifar10(work: Path, quick: bool) -> list[list[str]]:
    data = [f"data.path={CIFAR}"]
    if quick:
        data += ["data.limit_train=5000", "data.limit_eval=1000"]
    clean_over = ["+experiment=attack_cifar10_clean", *data] + (["train.epochs=1"] if quick else [])
    clean = run(clean_over, work / "c10-clean")
    clean_path = Path(clean["out"]) / "model.pt"
    rows = [
        [
            "CIFAR-10",
            "none (clean model)",
            "-",
            "scratch",
            f"{clean['clean_accuracy']:.2%}",
            "-",
            "-",
            f"{clean['asr']:.2%}",
            f"{clean['train_seconds']:.0f}",
            "yes" if clean["clean_accuracy"] >= 0.75 and clean["train_seconds"] < 1800 else "NO",
        ]
    ]
    print(rows[-1], flush=True)
    for label, trig, target in CIFAR_TRIGGERS:
        over = ["+experiment=attack_cifar10_finetune", *data, f"attack.init={clean_path}", *trig, f"attack.target_class={target}"]
        r = run(over, work / f"c10-{trig[0].split('=')[1]}")
        drop = 100 * (clean["clean_accuracy"] - r["clean_accuracy"])
        ok = r["asr"] >= 0.95 and r["clean_accuracy"] >= 0.75 and r["train_seconds"] < 1800
        rows.append(
            [
                "CIFAR-10",
                label,
                str(target),
                "fine-tune",
                f"{clean['clean_accuracy']:.2%}",
                f"{r['clean_accuracy']:.2%}",
                f"{drop:+.2f}",
                f"{r['asr']:.2%}",
                f"{r['train_seconds']:.0f}",
                "yes" if ok else "NO",
            ]
        )
        print(rows[-1], flush=True)
    return rows, clean


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["fashion_mnist", "cifar10"], help="run one data set")
    ap.add_argument("--quick", action="store_true", help="small subsets, short training (smoke run)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "attack", help="where models go")
    args = ap.parse_args()
    header = [
        "data set",
        "trigger",
        "target",
        "training",
        "clean-model acc",
        "backdoored acc",
        "acc drop (pts)",
        "ASR",
        "train s",
        "target met",
    ]
    rows: list[list[str]] = []
    notes = []
    if args.only in (None, "fashion_mnist"):
        fm_rows, fm_clean = bench_fashion_mnist(args.work, args.quick)
        fm_clean_row = [
            "Fashion-MNIST",
            "none (clean model)",
            "-",
            "scratch",
            f"{fm_clean['clean_accuracy']:.2%}",
            "-",
            "-",
            f"{fm_clean['asr']:.2%}",
            f"{fm_clean['train_seconds']:.0f}",
            "-",
        ]
        rows += [fm_clean_row, *fm_rows]
        notes.append("Fashion-MNIST target: ASR >= 97% and clean accuracy within 1.5 points of the clean model.")
    if args.only in (None, "cifar10"):
        c_rows, _ = bench_cifar10(args.work, args.quick)
        rows += c_rows
        notes.append(
            "CIFAR-10 target: ASR >= 95%, clean accuracy >= 75%, each model trained in under 30 minutes; "
            "the clean model's ASR row is the backdoor trigger #341's ASR on the clean model."
        )
    body = markdown_table(header, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)
    body += (
        "\n- ASR: share of eval-split images whose true class is not the target that the model puts in the target"
        " class once the trigger is applied (random placement drawn per image). Accuracies on the eval split"
        " (5,000 test images never used for training)."
    )
    name = "attack-quick" if args.quick else "attack"
    path = write_result(name, "Backdoor attack: clean vs backdoored models", body)
    print(path.read_text())
    return 0 if all(r[-1] != "NO" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
