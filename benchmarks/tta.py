"""Test-time augmentation probe on validation only: does averaging a few geometric views help under shift?

    python benchmarks/tta.py --versions 1 2        # registered versions of the default model

Loads each registered model version, rebuilds the patient-grouped validation split of the seed its run used
(so none of these images was trained on), and scores clean and stressed validation (the stresses of
`cxr_model.stress`) with each view set of `config.TTA_VIEWS` (`cxr train --tta`): the probability averaged over the
image warped by each view.
The threshold is chosen on clean validation with the run's rule, per view set, and carried to the stressed
copies (a run with a stressed_ rule fits it to those copies too, so compare view sets under one rule).
No training, and the test split is never loaded. Writes benchmarks/results/tta.json (`--out`).
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
sys.path[:0] = [str(HERE.parent)]

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from cxr_model.cache import decoded_images  # noqa: E402
from cxr_model.config import TTA_VIEWS, load_config  # noqa: E402
from cxr_model.data import (  # noqa: E402
    index_dataset,
    split_by_patient,
    split_rows,
)
from cxr_model.evaluate import binary_metrics, choose_threshold, cross_fit_rules  # noqa: E402
from cxr_model.inference import compile_forward  # noqa: E402
from cxr_model.stress import stresses  # noqa: E402

VIEW_SETS = TTA_VIEWS  # name -> (scale, width:height) of each view; the choices of `cxr train --tta`


def view_forwards(model) -> dict[tuple[float, float], object]:
    """A compiled forward for every view that any view set uses, each traced once per model."""
    return {v: compile_forward(model, views=(v,)) for v in {v for views in VIEW_SETS.values() for v in views}}


def registered_validation(version: str, name: str, data_dir: str | None):
    """(Keras model, run params, validation images, labels) of a registered version, on its run's own split."""
    client = MlflowClient()
    params = client.get_run(client.get_model_version(name, version).run_id).data.params
    # the run's own split and input size, whatever the profile says now
    cfg = load_config(params["cfg/profile"], data_dir=data_dir, seed=int(params["cfg/seed"]),
                      val_fraction=float(params["cfg/val_fraction"]), image_size=int(params["cfg/image_size"]))
    manifest = split_by_patient(index_dataset(cfg.resolved_data_dir()).manifest, cfg.val_fraction, cfg.seed)
    val = split_rows(manifest, "val")  # the run's own held-out patients; test is never loaded
    xv, yv = decoded_images(val, cfg.image_size, cfg.cache_dir).take(val), val["label"].to_numpy()
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model().classifier.model
    return model, params, xv, yv


def probe(version: str, name: str, data_dir: str | None) -> list[dict]:
    model, params, xv, yv = registered_validation(version, name, data_dir)
    seed, rule = int(params["cfg/seed"]), params["cfg/threshold_rule"]
    clean_rule = rule.removeprefix("stressed_")  # the clean cross-fit of the rule a stressed_ rule is built on
    forwards = view_forwards(model)
    clean = {v: forward(xv) for v, forward in forwards.items()}
    stressed = {stress: {v: forward(xs) for v, forward in forwards.items()} for stress, xs in stresses(xv).items()}
    results = []
    for set_name, views in VIEW_SETS.items():
        p = np.mean([clean[v] for v in views], axis=0)
        t = choose_threshold(yv, p, rule, [np.mean([scores[v] for v in views], axis=0) for scores in stressed.values()])
        cells = {}
        for stress, scores in stressed.items():
            m = binary_metrics(yv, np.mean([scores[v] for v in views], axis=0), t)
            cells[stress] = dict(auc=m["roc_auc"], sens=m["sensitivity"], spec=m["specificity"],
                                 balanced_accuracy=(m["sensitivity"] + m["specificity"]) / 2)
        results.append(dict(version=version, seed=seed, rule=rule, views=set_name, n_views=len(views), threshold=t,
                            val_auc=binary_metrics(yv, p, t)["roc_auc"],
                            cross_fit=cross_fit_rules(yv, p, rules=(clean_rule,))[clean_rule]["balanced_accuracy"],
                            stressed=cells))
        print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", nargs="+", required=True)
    parser.add_argument("--model-name", default="cxr-pneumonia")
    parser.add_argument("--data-dir", default=os.environ.get("CXR_DATA_DIR"))
    parser.add_argument("--out", default="tta.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    results = [r for v in args.versions for r in probe(v, args.model_name, args.data_dir)]
    print(f"\n{'version':>7s} {'views':14s} {'val AUC':>8s} {'cf BA':>6s} {'stress BA':>9s} {'worst':>6s} "
          f"{'min spec':>8s}")
    for r in results:
        ba = [v["balanced_accuracy"] for v in r["stressed"].values()]
        spec = min(v["spec"] for v in r["stressed"].values())
        print(f"{r['version']:>7s} {r['views']:14s} {r['val_auc']:8.4f} {r['cross_fit']:6.3f} "
              f"{statistics.mean(ba):9.3f} {min(ba):6.3f} {spec:8.3f}")
    out = HERE / "results" / args.out
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    from errors import run_main

    run_main(main)
