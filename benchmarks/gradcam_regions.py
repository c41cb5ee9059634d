"""Where the evidence sits, on validation only: the share of each Grad-CAM map inside a central chest box.

    python benchmarks/gradcam_regions.py RUN_ID [RUN_ID ...]       # run folders under work/outputs/

For each finished run, loads its saved model and manifest (`work/outputs/<run id>/`), takes up to `--per-class`
validation images of each class (a fixed random draw; none was trained on), and computes Grad-CAM of the true
class (`cxr_model.gradcam`: the NORMAL map is what lowers the pneumonia logit). Each map is normalised to sum 1
and split into a central box (rows 20-80 %, columns 15-85 % of the frame: 42 % of it, where the lungs and heart
of a well-framed chest film sit), the top band (rows 0-20 %: shoulders, neck) and the bottom band (rows 80-100 %:
upper abdomen). A map spread evenly would put 0.42 / 0.20 / 0.20 there. The box is a fixed frame, not a lung
mask: a crude but model-independent check of whether a model reads the chest or its surroundings.
The test split is never loaded. Prints a table and writes benchmarks/results/gradcam_regions.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cxr_model.cache import decoded_images  # noqa: E402
from cxr_model.data import split_rows  # noqa: E402
from cxr_model.gradcam import gradcam  # noqa: E402

ROWS, COLS = (0.2, 0.8), (0.15, 0.85)  # the central box, as fractions of the side


def region_shares(cams: np.ndarray) -> dict[str, np.ndarray]:
    """(N,) share of each (N, S, S) map's mass in the central box, the top band and the bottom band."""
    side = cams.shape[1]
    r0, r1 = (round(f * side) for f in ROWS)
    c0, c1 = (round(f * side) for f in COLS)
    mass = cams / cams.sum(axis=(1, 2), keepdims=True).clip(1e-9)
    return dict(box=mass[:, r0:r1, c0:c1].sum(axis=(1, 2)), top=mass[:, :r0].sum(axis=(1, 2)),
                bottom=mass[:, r1:].sum(axis=(1, 2)))


def class_region_shares(model: keras.Model, images: np.ndarray, labels: np.ndarray, per_class: int,
                        seed: int) -> dict[str, dict]:
    """{"NORMAL": ..., "PNEUMONIA": ...}: median region shares of the true class's maps over a fixed random draw of
    up to `per_class` of `images` (N, S, S, 1) of each class, and how many were drawn."""
    rng = np.random.default_rng(seed)
    out = {}
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        rows = np.flatnonzero(labels == label)
        picks = np.sort(rng.choice(rows, min(per_class, len(rows)), replace=False))
        shares = region_shares(gradcam(model, images[picks], classes=np.full(len(picks), label)))
        out[name] = {k: float(np.median(v)) for k, v in shares.items()} | dict(images=len(picks))
    return out


def run_regions(folder: Path, cache_dir: Path, per_class: int, seed: int) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    manifest = pd.read_csv(folder / "manifest.csv")
    val = split_rows(manifest, "val").sort_values("path")  # the test split is never decoded
    images = decoded_images(val, meta["image_size"], cache_dir).take(val)
    model = keras.models.load_model(folder / "model.keras", compile=False)
    return dict(run_id=meta.get("run_id", folder.name), image_size=meta["image_size"],
                **class_region_shares(model, images, val["label"].to_numpy(), per_class, seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run ids (folders under --work-dir/outputs) or run folders")
    parser.add_argument("--work-dir", type=Path, default=Path("work"))
    parser.add_argument("--per-class", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gradcam_regions.json")
    args = parser.parse_args()
    results = []
    for run in args.runs:
        folder = Path(run) if Path(run).is_dir() else args.work_dir / "outputs" / run
        if not (folder / "model.keras").is_file():
            parser.error(f"{folder} holds no model.keras: pass a run id under {args.work_dir / 'outputs'} "
                         "or a run folder")
        results.append(run_regions(folder, args.work_dir / "cache", args.per_class, args.seed))
    print(f"{'run':34s} {'class':9s} {'box':>5s} {'top':>5s} {'bottom':>6s}   (even spread: 0.42 0.20 0.20)")
    for r in results:
        for name in ("NORMAL", "PNEUMONIA"):
            m = r[name]
            print(f"{r['run_id']:34s} {name:9s} {m['box']:5.2f} {m['top']:5.2f} {m['bottom']:6.2f}")
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from errors import run_main

    run_main(main)
