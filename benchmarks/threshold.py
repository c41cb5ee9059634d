"""Threshold-rule probe on validation only: which rule's threshold holds up under a shift it was not fitted to?

    python benchmarks/threshold.py --model-name cxr-pneumonia-bench --versions 1 2 3

Loads each registered model version, rebuilds its run's patient-grouped validation split, and scores it clean
and under each stress of `cxr_model.stress`, averaged over the default test-time views. Then, leave one stress
out (`cxr_model.evaluate.cross_fit_stressed`): validation is halved at random 20 times; each rule fits its
threshold on one half (the stressed_ rules on the clean scores and the six other stresses) and is scored on the
other half under the held-out stress. The held-out stress stands in for a scanner none of the rules has seen.
No training, and the test split is never loaded. Writes benchmarks/results/threshold.json (`--out`).
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

from tta import registered_validation  # noqa: E402

from cxr_model.config import TTA_VIEWS, TrainConfig  # noqa: E402
from cxr_model.evaluate import STRESS_CV_RULES, choose_threshold, cross_fit_stressed  # noqa: E402
from cxr_model.inference import compile_forward  # noqa: E402
from cxr_model.stress import stressed_scores  # noqa: E402

RULES = STRESS_CV_RULES  # margin, youden, stressed_margin, stressed_youden


def probe(version: str, name: str, data_dir: str | None, views: str) -> dict:
    model, params, xv, yv = registered_validation(version, name, data_dir)
    predict = compile_forward(model, views=TTA_VIEWS[views])
    p = predict(xv)
    stressed = stressed_scores(predict, xv)
    thresholds = {r: choose_threshold(yv, p, r, list(stressed.values())) for r in RULES}
    result = dict(version=version, seed=int(params["cfg/seed"]), views=views, thresholds=thresholds,
                  rules=cross_fit_stressed(yv, p, stressed, RULES, seed=int(params["cfg/seed"])))
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", nargs="+", required=True)
    parser.add_argument("--model-name", default="cxr-pneumonia")
    parser.add_argument("--views", default=TrainConfig().tta, choices=list(TTA_VIEWS))
    parser.add_argument("--data-dir", default=os.environ.get("CXR_DATA_DIR"))
    parser.add_argument("--out", default="threshold.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    results = [probe(v, args.model_name, args.data_dir, args.views) for v in args.versions]
    print(f"\n{'version':>7s} {'rule':16s} {'threshold':>9s} {'held-out stress BA':>18s} {'worst':>6s} {'sens':>6s} "
          f"{'spec':>6s} {'clean BA':>8s}")
    for r in results:
        for rule, row in r["rules"].items():
            print(f"{r['version']:>7s} {rule:16s} {r['thresholds'][rule]:9.3f} "
                  f"{row['stressed_balanced_accuracy']:18.3f} {row['worst_stress_balanced_accuracy']:6.3f} "
                  f"{row['stressed_sensitivity']:6.3f} "
                  f"{row['stressed_specificity']:6.3f} {row['clean_balanced_accuracy']:8.3f}")
    print("\nmean over versions")
    for rule in RULES:
        rows = [r["rules"][rule] for r in results]
        print(f"{rule:16s} " + " ".join(f"{k}={statistics.mean(x[k] for x in rows):.3f}" for k in rows[0]))
    out = HERE / "results" / args.out
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    from errors import run_main

    run_main(main)
