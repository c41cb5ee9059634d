"""Snapshot probe on validation only: does averaging the best epochs of one training run beat the best epoch?

    python benchmarks/snapshots.py --seeds 2            # trains the geometry recipe, seeds 0 and 1 (~13 min each)
    python benchmarks/snapshots.py --scores work/snapshot-scores   # re-scores saved epochs, no training

Each seed trains the `geometry` recipe of benchmarks/recipe.py (the default profile's augmentation, no time
budget, early stopping on validation AUC as in a run) and scores every epoch on clean validation and on its
stressed copies (`cxr_model.stress`), saving the scores under --scores. The candidates are the models a run
could register: the best epoch alone (`--snapshots 1`), the mean of the k best epochs by validation AUC (what
`--snapshots k` saves) and the mean of the last three. Each is judged as the flow judges a model: ROC AUC clean
and stressed, and the leave-one-stress-out check of the `stressed_margin` threshold rule
(`cxr_model.evaluate.cross_fit_stressed`). One view per image (no test-time views), to keep the probe short.
The test split is never loaded. Writes benchmarks/results/snapshots.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import keras  # noqa: E402
import numpy as np  # noqa: E402
from recipe import BASE, BASE_SIZE, RECIPES, train_and_validation  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from cxr_model.config import load_config  # noqa: E402
from cxr_model.evaluate import cross_fit_stressed  # noqa: E402
from cxr_model.fitting import fit_recipe  # noqa: E402
from cxr_model.inference import compile_forward  # noqa: E402
from cxr_model.model import ConvNetConfig, build_convnet  # noqa: E402
from cxr_model.stress import STRESSES, stresses  # noqa: E402

RECIPE = "geometry"  # the default profile's training recipe


class ScoreEachEpoch(keras.callbacks.Callback):
    """Saves every epoch's validation scores, clean and stressed, to `folder/s{seed}_e{epoch}.npz`."""

    def __init__(self, x_val: np.ndarray, folder: Path, seed: int):
        super().__init__()
        self.views = {"clean": x_val, **stresses(x_val)}
        self.folder, self.seed, self.predict = folder, seed, None

    def on_epoch_end(self, epoch, logs=None):
        self.predict = self.predict or compile_forward(self.model)  # traced once; reads the current weights
        np.savez(self.folder / f"s{self.seed}_e{epoch:02d}.npz", **{k: self.predict(v) for k, v in self.views.items()})


def train(seed: int, splits, folder: Path) -> None:
    model_over, train_over = RECIPES[RECIPE]
    cfg = load_config("default", seed=seed, train_minutes=0, snapshots=1, **{"image_size": BASE_SIZE, **train_over})
    keras.utils.set_random_seed(seed)
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    model = build_convnet(ConvNetConfig(image_size=cfg.image_size, **{**BASE, **model_over}))
    started = time.perf_counter()
    fit_recipe(model, cfg, xt, yt, xv, yv, callbacks=[ScoreEachEpoch(xv, folder, seed)])
    print(f"seed {seed}: trained in {(time.perf_counter() - started) / 60:.1f} min", flush=True)


def judge(y: np.ndarray, scores: dict[str, np.ndarray]) -> dict[str, float]:
    cv = cross_fit_stressed(y, scores["clean"], {s: scores[s] for s in STRESSES}, rules=("stressed_margin",))
    stressed_auc = [roc_auc_score(y, scores[s]) for s in STRESSES]
    return dict(val_auc=roc_auc_score(y, scores["clean"]), stressed_auc=float(np.mean(stressed_auc)),
                worst_stressed_auc=min(stressed_auc), **cv["stressed_margin"])


def candidates(epochs: list[dict[str, np.ndarray]], y: np.ndarray) -> dict[str, tuple[list[int], dict]]:
    """name -> (1-based epochs averaged, their mean scores)."""
    ranked = sorted(range(len(epochs)), key=lambda i: -roc_auc_score(y, epochs[i]["clean"]))  # stable on ties

    def mean(picks: list[int]) -> tuple[list[int], dict]:
        return [i + 1 for i in picks], {k: np.mean([epochs[i][k] for i in picks], axis=0) for k in epochs[0]}

    out = {"best epoch": mean(ranked[:1])}
    out.update({f"best {k} mean": mean(ranked[:k]) for k in (2, 3, 4) if k <= len(epochs)})
    out["last 3 mean"] = mean(list(range(len(epochs)))[-3:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=0, help="train this many seeds first (0: only re-score)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--scores", type=Path, default=Path("work/snapshot-scores"), help="per-epoch scores folder")
    parser.add_argument("--data-dir", default=os.environ.get("CXR_DATA_DIR"))
    args = parser.parse_args()
    args.scores.mkdir(parents=True, exist_ok=True)
    splits = train_and_validation(args.data_dir)
    y = splits["val"][1]
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        train(seed, splits, args.scores)
    seeds = sorted({int(p.name[1:].split("_")[0]) for p in args.scores.glob("s*_e*.npz")})
    if not seeds:
        parser.error(f"no per-epoch scores in {args.scores}: train some with --seeds N")
    results = []
    print(f"\n{'seed':>4s} {'candidate':14s} {'epochs':14s} {'val AUC':>8s} {'stress AUC':>10s} {'worst':>7s} "
          f"{'stress BA':>9s} {'worst BA':>8s} {'clean BA':>8s}")
    for seed in seeds:
        epochs = [dict(np.load(p)) for p in sorted(args.scores.glob(f"s{seed}_e*.npz"))]
        for name, (picked, scores) in candidates(epochs, y).items():
            r = dict(seed=seed, candidate=name, epochs=picked, of=len(epochs), **judge(y, scores))
            results.append(r)
            print(f"{seed:4d} {name:14s} {','.join(map(str, picked)):14s} {r['val_auc']:8.4f} "
                  f"{r['stressed_auc']:10.4f} {r['worst_stressed_auc']:7.4f} {r['stressed_balanced_accuracy']:9.4f} "
                  f"{r['worst_stress_balanced_accuracy']:8.4f} {r['clean_balanced_accuracy']:8.4f}")
    out = HERE / "results" / "snapshots.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    from errors import run_main

    run_main(main)
