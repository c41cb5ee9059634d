"""Does the input pipeline keep up? The input-pipeline ratio of augmentation variants, measured side by side.

    python benchmarks/input_ratio.py                      # default augmentation vs the same without `resolution`
    python benchmarks/input_ratio.py --repeats 5 --images 2048

The ratio is `speed.py`'s: one training epoch of the fixed default architecture fed by the real `tf.data`
pipeline (decoded cache -> augmentation -> batches), over the same epoch fed one constant in-memory batch;
1.0 means the input never waits (issue 4 asks for <= 1.10). The variants run alternately, `--repeats` times
each, so drift of the machine hits them alike; the table gives each variant's median and the ratio of medians.
Writes benchmarks/results/input-ratio.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from speed import PROJECT, input_ratio, load_splits  # noqa: E402

from cxr_model.config import load_config  # noqa: E402
from cxr_model.model import build_augmentation, build_convnet  # noqa: E402

VARIANTS = {
    "default": {},
    "default without resolution": dict(resolution=0.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("CXR_DATA_DIR"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=2048, help="training images per timed epoch")
    args = parser.parse_args()
    if not args.data_dir:
        sys.exit("error: pass --data-dir or set CXR_DATA_DIR")
    x, y = load_splits(args.data_dir, PROJECT.image_size, None)["train"]
    x, y = x[: args.images], y[: args.images]
    ratios: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.repeats):
        for name, over in VARIANTS.items():
            aug = build_augmentation(**load_config("default", **over).augmentation_params())
            ratios[name].append(input_ratio(build_convnet(PROJECT), x, y, aug))
            print(f"repeat {r}: {name}: {ratios[name][-1]:.3f}", flush=True)
    medians = {name: statistics.median(v) for name, v in ratios.items()}
    first = next(iter(VARIANTS))
    print(f"\n{'augmentation':30s} {'median':>7s} {'runs':>24s} {'vs ' + first:>12s}")
    for name, v in ratios.items():
        print(f"{name:30s} {medians[name]:7.3f} {' '.join(f'{r:.3f}' for r in v):>24s} "
              f"{medians[name] / medians[first]:12.3f}")
    out = HERE / "results" / "input-ratio.json"
    out.write_text(json.dumps(dict(images=len(x), repeats=args.repeats, ratios=ratios, medians=medians), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
