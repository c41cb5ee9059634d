"""Threshold choice and metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_model.evaluate import binary_metrics, choose_threshold, classification_report


def test_metrics_match_hand_counts() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.7, 0.3, 0.8, 0.9, 0.4, 0.6, 0.95, 0.85])
    m = binary_metrics(y, p, 0.5)  # tp=5 fn=1 tn=3 fp=1
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["sensitivity"] == pytest.approx(5 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(5 / 6)
    assert m["f1"] == pytest.approx(5 / 6)
    assert 0.5 < m["roc_auc"] < 1.0 and 0.5 < m["pr_auc"] <= 1.0


def test_youden_threshold_separates_separable_scores() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.05, 0.2, 0.3, 0.6, 0.7, 0.9])
    t = choose_threshold(y, p, "youden")
    assert 0.3 < t <= 0.6
    assert binary_metrics(y, p, t)["accuracy"] == 1.0


def test_f1_threshold_and_unknown_rule() -> None:
    y = np.array([0, 1, 1, 1])
    p = np.array([0.4, 0.3, 0.8, 0.9])
    assert choose_threshold(y, p, "f1") == pytest.approx(0.3)
    with pytest.raises(ValueError, match="Unknown threshold rule"):
        choose_threshold(y, p, "median")


def test_one_class_validation_falls_back_to_half() -> None:
    assert choose_threshold(np.ones(4), np.array([0.2, 0.4, 0.6, 0.8])) == 0.5


def test_classification_report_names_both_classes() -> None:
    text = classification_report(np.array([0, 1]), np.array([0.2, 0.9]), 0.5)
    assert "NORMAL" in text and "PNEUMONIA" in text
