"""Run MESA's N generators (and statistics networks) as one batched module or
as a loop over N separate ones? The measurement behind core/generator.py's
choice of ``StaircaseGenerators``.

    python bench/generator_batching.py             # N = 3, 5, 7, 10; --repeats 5 (~2 min on 2 cores)
    python bench/generator_batching.py --quick     # N = 3 only, 2 repeats

One step = a forward and backward of every level's generator on a batch of
32 noise vectors (noise_dim 10, hidden 64, 3x3 grey triggers), and in the
second pair of columns also of its statistics network (hidden 128) on the
generator's output, as a MESA step does without the classifier. One torch
thread; median milliseconds per step over 200 steps, median of the repeats,
the two ways interleaved. Writes bench/results/generator_batching.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import markdown_table, write_result  # noqa: E402

from gdm_ray.core.generator import StaircaseGenerators, TriggerGenerator  # noqa: E402
from gdm_ray.core.statistics_network import StaircaseStatistics, StatisticsNetwork  # noqa: E402

STEPS, BATCH, NOISE = 200, 32, 10


def _step_ms(n: int, batched: bool, with_stats: bool) -> float:
    rng = torch.Generator().manual_seed(0)
    if batched:
        gens = StaircaseGenerators(n, 1, (3, 3), NOISE, 64, 2, False, "normal", generator=rng)
        stats = StaircaseStatistics(n, NOISE, gens.out_dim, 128, 2, generator=rng)
        params = list(gens.parameters()) + list(stats.parameters())

        def step() -> torch.Tensor:
            z = gens.sample_noise(BATCH, rng)
            pattern, _ = gens(z)
            out = pattern.flatten(2).sum()
            return out + stats(z, pattern.flatten(2)).sum() if with_stats else out
    else:
        gens_l = [TriggerGenerator(1, (3, 3), NOISE, 64, 2, False, "normal", generator=rng) for _ in range(n)]
        stats_l = [StatisticsNetwork(NOISE, gens_l[0].out_dim, 128, 2, generator=rng) for _ in range(n)]
        params = [p for m in gens_l + stats_l for p in m.parameters()]

        def step() -> torch.Tensor:
            total = torch.zeros(())
            for g, t in zip(gens_l, stats_l):
                z = g.sample_noise(BATCH, rng)
                pattern, _ = g(z)
                total = total + pattern.sum() + (t(z, pattern.flatten(1)).sum() if with_stats else 0)
            return total

    times = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        loss = step()
        for p in params:
            p.grad = None
        loss.backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    levels = [3] if args.quick else [3, 5, 7, 10]
    repeats = 2 if args.quick else args.repeats
    rows = []
    for n in levels:
        cells = []
        for with_stats in (False, True):
            loop, batched = [], []
            for _ in range(repeats):  # interleaved: drift favours neither way
                loop.append(_step_ms(n, False, with_stats))
                batched.append(_step_ms(n, True, with_stats))
            lo, ba = statistics.median(loop), statistics.median(batched)
            cells += [f"{lo:.2f}", f"{ba:.2f}", f"{lo / ba:.1f}x"]
        rows.append([str(n), *cells])
        print(rows[-1], flush=True)
    header = ["N", "generators: loop ms", "batched ms", "speedup", "+ statistics networks: loop ms", "batched ms", "speedup"]
    body = markdown_table(header, rows) + (
        f"\n\nMedian ms per forward+backward step ({STEPS} steps, batch {BATCH} per level, 1 thread), "
        f"median of {repeats} interleaved repeats.\n"
    )
    name = "generator_batching-quick" if args.quick else "generator_batching"
    print(body)
    print(f"wrote {write_result(name, 'MESA generators: one batched module vs a loop over N', body)}")


if __name__ == "__main__":
    main()
