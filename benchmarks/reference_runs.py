"""How good is the reference notebook's model, seed to seed? Train it as the notebook did and read test.

    python benchmarks/reference_runs.py --seeds 3                 # ~12 min a seed on a fast day, ~60 on a slow one
    python benchmarks/reference_runs.py --seeds 2 --first-seed 3

The issues' reference numbers (test accuracy 0.917, ROC AUC 0.966, specificity 0.821) come from one run. This
trains the same model (`benchmarks/reference.py`: 150² grayscale, five conv blocks, flatten, dense 128, RMSprop,
batch 32, its augmentation as Keras `Random*` layers) for its 12 epochs on the whole training folder (5,216
images; the notebook trained on ~4,900) and reads the test split once per seed at the notebook's threshold 0.5.
Nothing is chosen from test: the model, its epochs and its threshold are the notebook's, fixed in advance.
Appends to benchmarks/results/reference-runs.json (a rerun of a seed replaces it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import keras  # noqa: E402
from reference import BATCH_SIZE, EPOCHS, IMAGE_SIZE, build_reference, reference_augmentation  # noqa: E402

from cxr_model.cache import decoded_images  # noqa: E402
from cxr_model.config import load_config  # noqa: E402
from cxr_model.data import index_dataset, split_rows  # noqa: E402
from cxr_model.evaluate import binary_metrics  # noqa: E402
from cxr_model.inference import predict_proba  # noqa: E402
from cxr_model.pipelines import make_dataset  # noqa: E402

METRICS = ("accuracy", "roc_auc", "sensitivity", "specificity")


def run(seed: int, train, test) -> dict:
    (xt, yt), (xs, ys) = train, test
    keras.utils.set_random_seed(seed)
    model = build_reference()
    ds = make_dataset(xt, yt, BATCH_SIZE, reference_augmentation(seed), shuffle=True, seed=seed)
    started = time.perf_counter()
    model.fit(ds, epochs=EPOCHS, verbose=2)
    minutes = (time.perf_counter() - started) / 60
    return dict(seed=seed, minutes=minutes, **binary_metrics(ys, predict_proba(model, xs), 0.5))  # its threshold too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("CXR_DATA_DIR"))
    args = parser.parse_args()
    cfg = load_config("default", data_dir=args.data_dir, image_size=IMAGE_SIZE)
    manifest = index_dataset(cfg.resolved_data_dir()).manifest
    images = decoded_images(manifest, IMAGE_SIZE, cfg.cache_dir)
    # the Kaggle layout's 16-image val/ folder, where present, trains too (the notebook had no use for it either)
    parts = {"train": manifest[manifest["split"] != "test"], "test": split_rows(manifest, "test")}
    train, test = ((images.take(p), p["label"].to_numpy()) for p in parts.values())
    out = HERE / "results" / "reference-runs.json"
    runs = json.loads(out.read_text()) if out.exists() else []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        row = run(seed, train, test)
        print(json.dumps(row), flush=True)
        runs = [r for r in runs if r["seed"] != seed] + [row]
        out.write_text(json.dumps(sorted(runs, key=lambda r: r["seed"]), indent=2))  # after every seed
    print(f"\n{'seed':>4s} {'min':>5s} " + " ".join(f"{m:>11s}" for m in METRICS))
    for r in sorted(runs, key=lambda r: r["seed"]):
        print(f"{r['seed']:4d} {r['minutes']:5.1f} " + " ".join(f"{r[m]:11.3f}" for m in METRICS))
    if len(runs) > 1:
        values = {m: [r[m] for r in runs] for m in METRICS}
        cells = (f"{statistics.mean(v):.3f}±{statistics.stdev(v):.3f}" for v in values.values())
        print("mean ± sd  " + " ".join(cells))


if __name__ == "__main__":
    from errors import run_main

    run_main(main)
