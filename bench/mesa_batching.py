"""Train the N staircase levels together or one after another? (issue: "when that is faster, measure it")

    python bench/mesa_batching.py            # Fashion-MNIST CNN and CIFAR-10 ResNet-9 (~6 min)
    python bench/mesa_batching.py --quick    # synthetic model only (~30 s)

"Together" is what MESA does: one step runs the N generators and statistics
networks batched and makes ONE classifier forward+backward over the
concatenated N x batch triggered images. "Separate" trains each level on its
own (N runs of a one-level MESA with that level's beta), N classifier passes
of one batch each per step. Same steps, same batch per level, same
threads, freed memory kept as the commands keep it; runs interleaved, median of --repeats. Uses the backdoored models
of bench/attack.py (fm-bw3x3, c10-bw3x3). Writes bench/results/mesa_batching.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from report import markdown_table, write_result  # noqa: E402

from gdm_ray.core.allocator import keep_freed_memory  # noqa: E402
from gdm_ray.core.attack import BadNets  # noqa: E402
from gdm_ray.core.data import DataSpec, ImageSet, load_splits  # noqa: E402
from gdm_ray.core.mesa import MESA, MESAConfig  # noqa: E402
from gdm_ray.core.model_io import load_model  # noqa: E402
from gdm_ray.core.models import build_model  # noqa: E402
from gdm_ray.core.train import TrainConfig  # noqa: E402
from gdm_ray.core.triggers import TriggerSpec, make_trigger  # noqa: E402

WORK = ROOT / "bench" / "work" / "attack"
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10" / "cifar10-jpg.tar.gz"


def cases(quick: bool) -> list[tuple[str, torch.nn.Module, ImageSet]]:
    out = []
    if quick or not (WORK / "fm-bw3x3" / "model.pt").is_file():
        sp = load_splits(DataSpec(name="synthetic", samples=3000, num_classes=4, image_size=[16, 16], seed=3))
        model = build_model("small_cnn", 1, 4, 8)
        trig = make_trigger(TriggerSpec(family="bw3x3", number=341), 1, (16, 16))
        BadNets(trig, 0, 0.2).fit(
            model, sp.train, sp.eval, TrainConfig(epochs=3, batch_size=64, lr=0.05, channels_last=False), torch.Generator().manual_seed(0)
        )
        out.append(("synthetic 16x16, small CNN w8", model.eval(), sp.defense))
    if not quick:
        fm = load_splits(DataSpec(name="fashion_mnist", path="/usr/share/datasets/fashion-mnist"))
        out.append(("Fashion-MNIST, small CNN w32", load_model(WORK / "fm-bw3x3" / "model.pt", fm.shape, 10).module, fm.defense))
        if (WORK / "c10-bw3x3" / "model.pt").is_file() and CIFAR.is_file():
            c10 = load_splits(DataSpec(name="cifar10", path=str(CIFAR)))
            out.append(("CIFAR-10, ResNet-9 w16", load_model(WORK / "c10-bw3x3" / "model.pt", c10.shape, 10).module, c10.defense))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--levels", type=int, nargs="+", default=[3, 5])
    args = ap.parse_args()
    kept = keep_freed_memory()  # as every gdm-ray command does (keep_freed_memory: true)
    rows = []
    for label, model, data in cases(args.quick):
        for n in args.levels:
            betas = [i / n for i in range(n)]
            common = dict(steps=args.steps, batch_size=32, log_every=args.steps, eval_samples=32)
            together, separate = [], []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                MESA(MESAConfig(levels=n, **common)).fit(model, data, 0, torch.Generator().manual_seed(r))
                together.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for b in betas:
                    MESA(MESAConfig(levels=1, betas=[b], **common)).fit(model, data, 0, torch.Generator().manual_seed(r))
                separate.append(time.perf_counter() - t0)
                print(f"{label}, N={n}, repeat {r}: together {together[-1]:.1f}s, separate {separate[-1]:.1f}s", flush=True)
            t, s = statistics.median(together), statistics.median(separate)
            rows.append([label, str(n), f"{1000 * t / args.steps:.1f}", f"{1000 * s / args.steps:.1f}", f"{s / t:.2f}x"])
    header = ["model", "levels N", "together: ms/step", "separate: ms/step (N runs)", "speedup of together"]
    body = markdown_table(header, rows) + (
        f"\n\n- {args.steps} steps, batch 32 per level, 3x3 trigger, "
        f"torch threads {torch.get_num_threads()}; freed memory kept (keep_freed_memory): {'yes' if kept else 'no'};"
        f" median of {args.repeats} interleaved repeats. ms/step counts all N levels (the separate runs summed)."
    )
    path = write_result("mesa_batching-quick" if args.quick else "mesa_batching", "MESA: levels trained together vs separately", body)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
