"""Training-step cost against network width: where the default network's FLOPs go on two cores.

    python benchmarks/width.py                   # widths 16 24 32 40 48 64, 5 rounds
    python benchmarks/width.py --filters 32 48 --repeats 5

Each network is the default architecture (128², stride-2 stem, 4 blocks, one conv each, GAP, dense 64) with
`filters` in the first block (doubled per block, capped at 256). It is trained on one constant in-memory batch of
32 random images, so only the model's own cost is timed (the real input pipeline keeps up: benchmarks/speed.py,
input ratio). The widths are timed in turn, `--repeats` rounds of `--steps` steps each, so a slow spell of the
machine falls on all of them. For each width it prints images per second (the median over the rounds),
FLOPs per image per training step (3 x the forward count of `cxr_model.model.count_flops`), the achieved
GFLOP/s, that as a share of this machine's float32 matmul rate (measured once a round, median), and time and FLOPs
per image relative to 32 filters (the default). No data is read. Writes benchmarks/results/width.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from speed import matmul_peak  # noqa: E402

from cxr_model.model import ConvNetConfig, build_convnet, count_flops  # noqa: E402

BATCH = 32


def timers(filters: list[int], steps: int) -> dict[int, Callable[[], float]]:
    """A warmed-up `() -> images/s over steps steps` per width: the default architecture, one constant batch."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0, 255, (BATCH, 128, 128, 1)).astype("float32"))
    y = tf.constant((np.arange(BATCH) % 2).astype("float32"))
    batches = tf.data.Dataset.from_tensors((x, y)).repeat()
    out = {}
    for f in filters:
        keras.utils.set_random_seed(0)
        model = build_convnet(ConvNetConfig(image_size=128, blocks=4, filters=f, convs_per_block=1, dense_units=64))
        model.fit(batches.take(3), epochs=1, verbose=0)  # trace and warm up

        def rate(model=model) -> float:
            started = time.perf_counter()
            model.fit(batches.take(steps), epochs=1, verbose=0)
            return steps * BATCH / (time.perf_counter() - started)

        out[f] = rate
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filters", type=int, nargs="+", default=[16, 24, 32, 40, 48, 64])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="width.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1 or min(args.filters) < 1:
        parser.error("--steps, --repeats and every --filters value must be at least 1")
    timer = timers(args.filters, args.steps)
    rates: dict[int, list[float]] = {f: [] for f in args.filters}
    peaks = []
    for _ in range(args.repeats):  # round robin: a slow spell of the machine hits every width alike
        peaks.append(matmul_peak(reps=3))
        for f in args.filters:
            rates[f].append(timer[f]())
    peak = statistics.median(peaks)
    rows = []
    for f in args.filters:
        ips = statistics.median(rates[f])
        flops = 3 * count_flops(ConvNetConfig(image_size=128, blocks=4, filters=f, convs_per_block=1, dense_units=64))
        rows.append(dict(filters=f, images_per_second=ips, images_per_second_each=rates[f],
                         gflop_per_image_step=flops / 1e9,
                         gflops=flops * ips / 1e9, efficiency=flops * ips / 1e9 / peak))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["filters"] == 32), rows[0])
    print(f"\nmatmul peak {peak:.1f} GFLOP/s; ratios against {base['filters']} filters")
    print(f"{'filters':>7s} {'img/s':>7s} {'GFLOP/img-step':>15s} {'GFLOP/s':>8s} {'of peak':>8s} {'time/img':>9s} "
          f"{'FLOPs/img':>10s}")
    for r in rows:
        r["time_ratio"] = base["images_per_second"] / r["images_per_second"]
        r["flop_ratio"] = r["gflop_per_image_step"] / base["gflop_per_image_step"]
        print(f"{r['filters']:7d} {r['images_per_second']:7.1f} {r['gflop_per_image_step']:15.3f} {r['gflops']:8.1f} "
              f"{r['efficiency']:8.0%} {r['time_ratio']:8.2f}x {r['flop_ratio']:9.2f}x")
    out = HERE / "results" / args.out
    out.write_text(json.dumps(dict(matmul_peak_gflops=peak, batch=BATCH, steps=args.steps, repeats=args.repeats,
                                   cpus=os.cpu_count(), rows=rows),
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    from errors import run_main

    run_main(main)
