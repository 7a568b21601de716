"""How well the trigger-extent estimate (gdm_ray.core.extent) finds a trigger's
size and placement on models it has never seen, knowing only the target class.

    python bench/extent.py            # the dev models of bench/thirdparty.py (--dev), ~1 min each on 2 cores
    python bench/extent.py --judged   # bench/robust's Fashion-MNIST models: to report, never to choose settings on

For each backdoored model: the true trigger's size and placement (from its
card), the estimate MESA would use (`defend target_class=T` with no
mesa.trigger_size), the box the search found before growing, the placement
test's ASRs, and the estimate's area over the true trigger's bounding box
(1 = exact; MESA learns a mask inside, so a little above 1 is the aim).
Needs the models built: `python bench/thirdparty.py --dev` (or the zoo).
Writes bench/results/extent-dev.md (extent-judged.md with --judged).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from report import markdown_table, write_result  # noqa: E402

from gdm_ray.core.data import DataSpec, load_splits  # noqa: E402
from gdm_ray.core.extent import estimate_extent  # noqa: E402
from gdm_ray.core.first_pass import ScanConfig  # noqa: E402
from gdm_ray.core.mesa import MESAConfig  # noqa: E402
from gdm_ray.core.model_io import load_model  # noqa: E402

ZOO = ROOT / "bench" / "work" / "thirdparty"
DEV = ["dev-fm-lenet-ring5-random", "dev-fm-vgg-noise6-random", "dev-fm-preact-checker4-fixed", "dev-fm-preact-ell4x3-random",
       "dev-fm-vgg-cross5-fixed"]  # fmt: skip
JUDGED = ["fm-lenet-noise5-fixed", "fm-vgg-ring7-fixed", "fm-preact-bar2x7-random"]


def true_extent(card: dict) -> tuple[list[int], str]:
    spec = card["build_key"]["spec"]
    if spec["trigger"] in ("blend", "sig"):
        return list(card["input_shape"][1:]), "whole image"
    return list(spec["size"]), spec["placement"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--judged", action="store_true", help="the judged zoo's Fashion-MNIST models (report only)")
    ap.add_argument("--name", default="", help="a suffix for the results file (a variant's run)")
    args = ap.parse_args()
    names = JUDGED if args.judged else DEV
    torch.set_num_threads(2)
    splits = load_splits(DataSpec(name="fashion_mnist"))
    steps = MESAConfig().extent_steps
    rows, ratios, place_right = [], [], 0
    for name in names:
        card_path = ZOO / f"{name}.json"
        if not card_path.is_file():
            sys.exit(f"{card_path} is missing: build the models first (python bench/thirdparty.py {'' if args.judged else '--dev'})")
        card = json.loads(card_path.read_text())
        model = load_model(ZOO / card["model"]).module.eval()
        size, placement = true_extent(card)
        t0 = time.perf_counter()
        e = estimate_extent(model, splits.defense, int(card["target"]), torch.Generator().manual_seed(0), ScanConfig(steps=steps))
        secs = time.perf_counter() - t0
        ratio = (e.size[0] * e.size[1]) / (size[0] * size[1])
        ratios.append(ratio)
        est_place = "fixed" if e.position is not None else "random"
        right = placement == "whole image" and not e.compact or est_place == placement
        place_right += right
        rows.append([
            name, f"{size[0]}x{size[1]}", placement, f"{e.size[0]}x{e.size[1]}",
            est_place if e.compact else "whole image", "yes" if right else "NO", f"{e.box[2]}x{e.box[3]} at ({e.box[0]},{e.box[1]})",
            f"{e.asr_whole:.0%} / {e.asr_found:.0%} / {e.asr_random:.0%}", f"{ratio:.1f}", f"{secs:.0f}",
        ])  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)
    body = "\n\n".join(
        [
            f"{'Judged' if args.judged else 'Dev'} Fashion-MNIST models of bench/thirdparty.py; target class given; "
            f"defender's data: the Fashion-MNIST defense split; extent_steps={steps}.",
            markdown_table(
                [
                    "model",
                    "true size",
                    "true place",
                    "estimate",
                    "estimated place",
                    "place right",
                    "found box",
                    "ASR whole / box at found / box at random",
                    "area / true",
                    "s",
                ],
                rows,
            ),  # fmt: skip
            f"Area over the true trigger's: median {statistics.median(ratios):.1f}, worst {max(ratios):.1f}; "
            f"placement right on {place_right}/{len(names)}.",
        ]
    )
    stem = "extent-judged" if args.judged else "extent-dev"
    path = write_result(stem + (f"-{args.name}" if args.name else ""), "Trigger-extent estimate vs the true trigger", body)
    print(body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
