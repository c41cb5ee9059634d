"""Where the input pipeline's time goes: the augmentation's CPU cost per batch, part by part, against a training step.

    python benchmarks/pipeline.py [--size 96] [--batches 128]     # ~1 min, synthetic images: no data needed

Each row is the process CPU time of one batch (32 images, float32 0..255) through the default profile's augmentation
as the training pipeline runs it (a tf.data map, one thread), best of 3 passes over `--batches` batches; "without X"
sets that one range to 0. The last row is one training step of the default network (`PROJECT` of speed.py) on the
same batch, for scale: on two cores the augmentation and the step take turns on the same CPU, so the pipeline adds
about its share of the step to every epoch (speed.py's input-pipeline ratio). Writes results/pipeline.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from cxr_model.augmentation import build_augmentation  # noqa: E402
from cxr_model.config import AUGMENTATION_FIELDS, load_config  # noqa: E402
from cxr_model.model import build_convnet  # noqa: E402

BATCH = 32


def best_cpu_ms(run_once, batches: int) -> float:
    """Best of 3 calls of `run_once()` (each over `batches` batches), in process CPU milliseconds per batch."""
    passes = []
    for _ in range(3):
        started = time.process_time()
        run_once()
        passes.append((time.process_time() - started) / batches * 1e3)
    return min(passes)


def cpu_ms_per_batch(fn, x, batches: int) -> float:
    """CPU milliseconds per batch of `fn` mapped over `batches` copies of `x` in tf.data."""
    ds = tf.data.Dataset.from_tensors(x).repeat(batches).map(fn)
    for _ in ds.take(3):
        pass

    def drain():
        for _ in ds:
            pass

    return best_cpu_ms(drain, batches)


def step_cpu_ms(size: int, x, batches: int) -> float:
    """CPU milliseconds per training step of the default network on the batch `x`."""
    from speed import PROJECT  # the default's fixed network

    model = build_convnet(dataclasses.replace(PROJECT, image_size=size))
    y = tf.constant((np.arange(BATCH) % 2).astype("float32"))
    ds = tf.data.Dataset.from_tensors((x, y)).repeat(batches)
    model.fit(ds.take(3), epochs=1, verbose=0)
    return best_cpu_ms(lambda: model.fit(ds, epochs=1, verbose=0), batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=load_config("default").image_size)
    parser.add_argument("--batches", type=int, default=128)
    parser.add_argument("--out", default="pipeline.json", help="file name under benchmarks/results/ (default: "
                        "%(default)s, the committed numbers; give another name for a trial run)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 256, (BATCH, args.size, args.size, 1)).astype("float32"))
    params = load_config("default").augmentation_params()
    rows = {"identity (the map alone)": cpu_ms_per_batch(lambda a: a, x, args.batches),
            "augmentation, all parts": cpu_ms_per_batch(lambda a: build_augmentation(**params)(a), x, args.batches)}
    for field in AUGMENTATION_FIELDS:
        if params[field]:
            aug = build_augmentation(**{**params, field: 0.0})
            rows[f"  without {field}"] = cpu_ms_per_batch(lambda a, aug=aug: aug(a), x, args.batches)
    rows["training step of the default network"] = step_cpu_ms(args.size, x, args.batches)
    share = rows["augmentation, all parts"] / rows["training step of the default network"]
    print(f"{'CPU ms per batch of 32 at ' + str(args.size) + ' px':44s} {'ms':>6s}")
    for name, ms in rows.items():
        print(f"{name:44s} {ms:6.2f}")
    print(f"augmentation / training step: {share:.2f}")
    out = HERE / "results" / args.out
    out.write_text(json.dumps(dict(size=args.size, batch=BATCH, params=params, cpu_ms=rows, share=share), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    from errors import run_main

    run_main(main)
