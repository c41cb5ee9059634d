"""Threshold choice on validation and the test metrics computed once with that threshold."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def choose_threshold(y_true: np.ndarray, y_prob: np.ndarray, rule: str = "youden") -> float:
    """Pick the decision threshold on validation data.

    youden: max sensitivity + specificity - 1; balanced_accuracy: the same optimum, kept as an alias
    for readers who know it by that name; f1: max F1 of the PNEUMONIA class.
    """
    y_true = np.asarray(y_true).astype(int)
    if len(np.unique(y_true)) < 2:
        return 0.5  # a one-class validation set carries no information about the threshold
    if rule in ("youden", "balanced_accuracy"):
        fpr, tpr, thresholds = skm.roc_curve(y_true, y_prob)
        best = int(np.argmax(tpr - fpr))
        return float(np.clip(thresholds[best], 0.0, 1.0))
    if rule == "f1":
        precision, recall, thresholds = skm.precision_recall_curve(y_true, y_prob)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        return float(thresholds[int(np.argmax(f1))])
    raise ValueError(f"Unknown threshold rule {rule!r}")


def binary_metrics(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, precision, sensitivity, specificity, F1, ROC AUC and PR AUC at `threshold`."""
    y_true = np.asarray(y_true).astype(int)
    y_pred = (np.asarray(y_prob) >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    both = len(np.unique(y_true)) == 2
    return {
        "accuracy": float((tp + tn) / max(len(y_true), 1)),
        "precision": float(tp / (tp + fp)) if tp + fp else 0.0,
        "sensitivity": float(tp / (tp + fn)) if tp + fn else 0.0,
        "specificity": float(tn / (tn + fp)) if tn + fp else 0.0,
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(y_true, y_prob)) if both else float("nan"),
        "pr_auc": float(skm.average_precision_score(y_true, y_prob)) if both else float("nan"),
        "threshold": float(threshold),
    }


def classification_report(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> str:
    y_pred = (np.asarray(y_prob) >= threshold).astype(int)
    return skm.classification_report(
        np.asarray(y_true).astype(int), y_pred, labels=[0, 1], target_names=["NORMAL", "PNEUMONIA"],
        digits=4, zero_division=0,
    )
