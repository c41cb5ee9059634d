"""Evaluation task: threshold on validation, then one pass over the test split."""

from __future__ import annotations

from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel

import cxr_model.layers  # noqa: F401  (registers the model's own layers for loading)
from cxr_model import plots
from cxr_model.adapt import calibration_record
from cxr_model.cache import DecodedImages
from cxr_model.config import TrainConfig
from cxr_model.data import split_rows
from cxr_model.evaluate import (
    binary_metrics,
    called_pneumonia,
    choose_threshold,
    classification_report,
    cross_fit_rules,
    cross_fit_stressed,
)
from cxr_model.gradcam import gradcam
from cxr_model.inference import compile_forward
from cxr_model.stress import stressed_scores
from cxr_pneumonia.tasks.data import DataHandle, open_data
from cxr_pneumonia.tasks.tracking import in_run, log_figure, png_markdown, publish_markdown
from cxr_pneumonia.tasks.training import TrainedModel


class Evaluation(BaseModel):
    threshold: float
    val: dict[str, float]
    test: dict[str, float]
    val_stressed: dict[str, dict[str, float]] = {}  # stress -> validation metrics at the threshold
    # temperature and bias on the logit fitted on validation, and validation ECE before and after: `cxr adapt`
    # starts from probabilities calibrated on the source population
    calibration: dict[str, float] = {}


CROSS_FIT_REPEATS = 50  # halvings of validation per threshold-rule check (2 fits each)


def summary_markdown(cfg: TrainConfig, result: Evaluation, report: str, rules: dict[str, dict[str, float]],
                     stressed_rules: dict[str, dict[str, float]] | None = None) -> str:
    rows = "\n".join(
        f"| {name} | {result.val.get(name, float('nan')):.4f} | {result.test[name]:.4f} |"
        for name in ("accuracy", "precision", "sensitivity", "specificity", "f1", "roc_auc", "pr_auc", "brier", "ece")
    )
    stress_rows = "".join(f"| {name} | {m['sensitivity']:.3f} | {m['specificity']:.3f} | {m['roc_auc']:.4f} |\n"
                          for name, m in result.val_stressed.items())
    stressed_section = (
        "Validation under acquisition-like stresses (`cxr_model.stress`), at the threshold:\n\n"
        f"| stress | sensitivity | specificity | ROC AUC |\n|---|---|---|---|\n{stress_rows}\n"
        if stress_rows else ""
    )
    if stressed_rules:
        stressed_section += (
            "How each rule carries over to a stress it was not fitted to (leave one stress out, random halves "
            "of validation):\n\n| rule | balanced accuracy | worst stress | sensitivity | specificity | clean |\n"
            "|---|---|---|---|---|---|\n"
            + "".join(f"| {rule} | {r['stressed_balanced_accuracy']:.4f} | {r['worst_stress_balanced_accuracy']:.4f} "
                      f"| {r['stressed_sensitivity']:.3f} | {r['stressed_specificity']:.3f} "
                      f"| {r['clean_balanced_accuracy']:.4f} |\n" for rule, r in stressed_rules.items())
            + "\n"
        )
    return (
        f"# cxr-pneumonia evaluation ({cfg.profile} profile)\n\n"
        f"Threshold **{result.threshold:.4f}**, chosen on validation by the `{cfg.threshold_rule}` rule; "
        "the test split was read once, after every choice was fixed. Probabilities are averaged over "
        f"{len(cfg.views)} test-time view(s) (`{cfg.tta}`).\n\n"
        f"| metric | validation | test |\n|---|---|---|\n{rows}\n\n"
        "Brier score and ECE (expected calibration error, 10 equal-width bins) say how far the score is from a "
        "probability; lower is better, and the decision uses the threshold, not 0.5 (`plots/calibration.png`).\n\n"
        "How each threshold rule carries over within validation (pick on one half, score the other, "
        f"{2 * CROSS_FIT_REPEATS} fits):\n\n"
        "| rule | held-out balanced accuracy | threshold sd (logit) |\n|---|---|---|\n"
        + "".join(f"| {rule} | {row['balanced_accuracy']:.4f} | {row['threshold_logit_sd']:.3f} |\n"
                  for rule, row in rules.items())
        + "\n" + stressed_section
        + f"Reference: the from-scratch notebook reached test accuracy 0.8894.\n\n"
        f"```\n{report}\n```\n"
    )


def gradcam_figure(model: keras.Model, test: pd.DataFrame, images: DecodedImages, p_test: np.ndarray,
                   threshold: float, per_class: int = 4):
    """Grad-CAM for a fixed set of test images: the first `per_class` of each class by file name.

    The heatmap is of the image alone; the title's probability is the one evaluation used (over every test-time
    view), so the label in the title matches the confusion matrix. Each map explains the model's answer at the
    run's threshold: what speaks for PNEUMONIA where it answered PNEUMONIA, what speaks for NORMAL where it
    answered NORMAL.
    """
    picks = test.assign(prob=p_test).sort_values("path").groupby("label", group_keys=False).head(per_class)
    x = images.take(picks)
    answers = called_pneumonia(picks["prob"].to_numpy(), threshold).astype(int)  # (n,) 1 = PNEUMONIA
    titles = [f"{r.class_name} · p={r.prob:.2f} → {'PNEU' if a else 'NORM'}\n{Path(r.path).name[:22]}"
              for r, a in zip(picks.itertuples(), answers, strict=True)]
    return plots.gradcam_grid(x, gradcam(model, x, classes=answers), titles)


@task(name="evaluate", cache_policy=NONE)
def evaluate(cfg: TrainConfig, data: DataHandle, trained: TrainedModel, run_id: str) -> Evaluation:
    """Choose the threshold on validation, then score the test split once with it."""
    manifest, images = open_data(cfg, data)
    model = keras.models.load_model(trained.model_path, compile=False)
    val, test = (split_rows(manifest, s) for s in ("val", "test"))
    y_val, y_test = val["label"].to_numpy(), test["label"].to_numpy()
    predict = compile_forward(model, views=cfg.views)  # traced once for both splits
    x_val = images.take(val)
    p_val = predict(x_val)
    p_stressed = stressed_scores(predict, x_val)
    # fixed before test is read
    threshold = choose_threshold(y_val, p_val, cfg.threshold_rule, list(p_stressed.values()))
    print(f"Threshold {threshold:.4f} chosen on {len(y_val)} validation images and {len(p_stressed)} stressed "
          f"copies ({cfg.threshold_rule}); scoring the {len(y_test)} test images once")
    # how each rule's threshold carries over, on validation alone: to other images, and to an unseen stress
    rules = cross_fit_rules(y_val, p_val, repeats=CROSS_FIT_REPEATS, seed=cfg.seed)
    stressed_rules = cross_fit_stressed(y_val, p_val, p_stressed, seed=cfg.seed)
    p_test = predict(images.take(test))
    result = Evaluation(threshold=threshold, val=binary_metrics(y_val, p_val, threshold),
                        test=binary_metrics(y_test, p_test, threshold),
                        val_stressed={k: binary_metrics(y_val, p, threshold) for k, p in p_stressed.items()},
                        calibration=calibration_record(y_val, p_val))
    report = classification_report(y_test, p_test, threshold)
    summary = summary_markdown(cfg, result, report, rules, stressed_rules)
    with in_run(run_id):
        mlflow.log_metrics({f"val/final_{k}": v for k, v in result.val.items()})
        mlflow.log_metrics({f"val/stressed/{stress}_{k}": m[k] for stress, m in result.val_stressed.items()
                            for k in ("sensitivity", "specificity", "roc_auc")})
        mlflow.log_metrics({f"val/threshold_cv/{rule}_{k}": v for rule, row in rules.items() for k, v in row.items()})
        mlflow.log_metrics({f"val/threshold_stress_cv/{rule}_{k}": v for rule, row in stressed_rules.items()
                            for k, v in row.items()})
        mlflow.log_metrics({f"test/{k}": v for k, v in result.test.items()})
        mlflow.log_metrics({f"val/calibration_{k}": v for k, v in result.calibration.items()})
        mlflow.log_metric("test_accuracy", result.test["accuracy"])  # the reference notebook's headline
        figures = {
            "plots/gradcam_test.png": gradcam_figure(model, test, images, p_test, threshold),
            "plots/confusion_val.png": plots.confusion(y_val, p_val, threshold, "Validation"),
            "plots/confusion_test.png": plots.confusion(y_test, p_test, threshold, "Test"),
            "plots/roc.png": plots.roc({"validation": (y_val, p_val), "test": (y_test, p_test)}),
            "plots/calibration.png": plots.calibration({"validation": (y_val, p_val), "test": (y_test, p_test)},
                                                       threshold),
        }
        pngs = {name: log_figure(fig, name) for name, fig in figures.items()}
        mlflow.log_text(report, "evaluation/classification_report.txt")
        mlflow.log_text(summary, "evaluation/summary.md")
    publish_markdown("evaluation-summary", summary + "".join(png_markdown(n, p) for n, p in pngs.items()),
                     "Validation-chosen threshold and test metrics")
    print(summary)
    return result
