"""Threshold choice and metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_model.evaluate import (
    binary_metrics,
    choose_threshold,
    classification_report,
    cross_fit_rules,
    cross_fit_stressed,
    margin_threshold,
)


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


def test_calibration_matches_hand_counts() -> None:
    from cxr_model.evaluate import calibration_bins, expected_calibration_error

    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.7, 0.3, 0.8, 0.9, 0.4, 0.6, 0.95, 0.85])
    # in fifths: [0, .2) 0.1 | [.2, .4) 0.2 0.3 | [.4, .6) 0.4 | [.6, .8) 0.7 0.6 | [.8, 1] 0.8 0.9 0.95 0.85
    rows = calibration_bins(y, p, bins=5)
    assert [r["count"] for r in rows] == [1, 2, 1, 2, 4]
    assert [r["fraction_pneumonia"] for r in rows] == [0.0, 0.0, 1.0, 0.5, 1.0]
    assert [r["mean_score"] for r in rows] == pytest.approx([0.1, 0.25, 0.4, 0.65, 0.875])
    gaps = [0.1, 0.25, 0.6, 0.15, 0.125]
    assert expected_calibration_error(y, p, bins=5) == pytest.approx(
        sum(n / 10 * g for n, g in zip([1, 2, 1, 2, 4], gaps, strict=True)))
    assert calibration_bins([1], [1.0], bins=5)[0]["low"] == 0.8  # a score of exactly 1 is in the last bin
    m = binary_metrics(y, p, 0.5)
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert m["ece"] == pytest.approx(expected_calibration_error(y, p))
    perfect = binary_metrics(y, y.astype(float), 0.5)
    assert perfect["ece"] == 0.0 and perfect["brier"] == 0.0
    assert np.isnan(expected_calibration_error([], []))
    with pytest.raises(ValueError, match="NaN"):
        expected_calibration_error([0, 1, 1], [0.0, np.nan, 1.0])
    # labels shaped (N, 1), as Keras gives them, score as (N,)
    assert binary_metrics(y[:, None], p, 0.5)["brier"] == pytest.approx(m["brier"])


def test_calibration_figure_draws_each_split() -> None:
    from cxr_model import plots

    y = np.array([0, 0, 1, 1, 1])
    fig = plots.calibration({"validation": (y, np.array([0.1, 0.3, 0.7, 0.8, 0.9])), "test": (y[:0], np.array([]))},
                            threshold=0.5)
    top, bottom = fig.axes
    assert [line.get_label() for line in top.get_lines()][:2] == ["calibrated", "validation (ECE 0.200, Brier 0.048)"]
    assert len(bottom.patches) == 1  # one histogram: the empty split is left out


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


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def test_margin_threshold_sits_mid_gap_in_logit_space() -> None:
    # NORMAL logits -4..-2, PNEUMONIA logits 2..6: the gap's middle is logit 0, probability 0.5, while
    # Youden's J takes the edge of the gap, the highest-scoring threshold that still catches every PNEUMONIA.
    y = np.array([0] * 50 + [1] * 50)
    p = _sigmoid(np.concatenate([np.linspace(-4, -2, 50), np.linspace(2, 6, 50)]))
    assert margin_threshold(y, p, tail=0.0) == pytest.approx(0.5)
    assert choose_threshold(y, p, "youden") == pytest.approx(_sigmoid(np.array([2.0]))[0])
    shifted = _sigmoid(np.concatenate([np.linspace(-6, -4, 50), np.linspace(2, 6, 50)]))
    assert margin_threshold(y, shifted, tail=0.0) == pytest.approx(_sigmoid(np.array([-1.0]))[0])


def test_margin_threshold_ignores_one_outlier() -> None:
    y = np.array([0] * 40 + [1] * 60)
    z = np.concatenate([np.linspace(-5, -3, 40), np.linspace(1, 5, 60)])
    base = margin_threshold(y, _sigmoid(z))
    z[0] = 4.0  # one NORMAL image scored as confidently as PNEUMONIA
    assert margin_threshold(y, _sigmoid(z)) == pytest.approx(base, abs=0.02)
    assert choose_threshold(y, _sigmoid(z), "margin") == margin_threshold(y, _sigmoid(z))


def test_cross_fit_rules_scores_every_rule_on_held_out_halves() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0] * 60 + [1] * 140)
    p = _sigmoid(np.where(y == 1, 1.5, -1.5) + rng.normal(0, 1.0, len(y)))
    table = cross_fit_rules(y, p, repeats=5)
    assert set(table) == {"margin", "youden", "balanced_accuracy", "f1"}
    for row in table.values():
        assert 0.75 < row["balanced_accuracy"] < 1.0 and row["threshold_logit_sd"] > 0
    assert cross_fit_rules(np.array([0, 1, 1, 1, 1]), np.linspace(0.1, 0.9, 5)) == {}  # too few to split
    # each score is of a half the threshold was not fitted on: recomputed over the same halvings
    from sklearn.model_selection import RepeatedStratifiedKFold

    from cxr_model.evaluate import called_pneumonia

    held_out = []
    for fit, held in RepeatedStratifiedKFold(n_splits=2, n_repeats=3, random_state=0).split(p, y):
        called = called_pneumonia(p[held], choose_threshold(y[fit], p[fit], "youden"))
        held_out.append((called[y[held] == 1].mean() + (~called[y[held] == 0]).mean()) / 2)
    assert cross_fit_rules(y, p, rules=("youden",), repeats=3)["youden"]["balanced_accuracy"] == pytest.approx(
        np.mean(held_out))


def _shifted_normals(seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Separable clean scores, and stresses that push NORMAL scores up by different amounts (logit units)."""
    rng = np.random.default_rng(seed)
    y = np.array([0] * 80 + [1] * 220)
    z = np.where(y == 1, 2.5, -2.5) + rng.normal(0, 0.8, len(y))
    stressed = {f"s{k}": _sigmoid(z + np.where(y == 0, shift, 0.0) + rng.normal(0, 0.3, len(y)))
                for k, shift in enumerate((0.5, 1.0, 1.5, 2.0, 2.5))}
    return y, _sigmoid(z), stressed


def test_stressed_rules_fit_the_pooled_clean_and_stressed_scores() -> None:
    y, p, stressed = _shifted_normals()
    copies = list(stressed.values())
    pooled_y, pooled_p = np.tile(y, 1 + len(copies)), np.concatenate([p, *copies])
    assert choose_threshold(y, p, "stressed_margin", copies) == pytest.approx(margin_threshold(pooled_y, pooled_p))
    assert choose_threshold(y, p, "stressed_youden", copies) == pytest.approx(choose_threshold(pooled_y, pooled_p,
                                                                                               "youden"))
    # normals drift towards PNEUMONIA under stress, so the threshold fitted to the stresses sits higher
    assert choose_threshold(y, p, "stressed_margin", copies) > choose_threshold(y, p, "margin") + 0.05
    with pytest.raises(ValueError, match="stressed validation scores"):
        choose_threshold(y, p, "stressed_margin")
    with pytest.raises(ValueError, match="one score per validation image"):
        choose_threshold(y, p, "stressed_margin", [copies[0][:-1]])


def test_cross_fit_stressed_scores_each_rule_on_a_stress_it_did_not_see(monkeypatch: pytest.MonkeyPatch) -> None:
    import cxr_model.evaluate as evaluate

    y, p, stressed = _shifted_normals(1)
    fitted_on, choose = [], evaluate.choose_threshold

    def spy(y_true, y_prob, rule="margin", stressed_copies=()):
        fitted_on.append(len(stressed_copies))
        return choose(y_true, y_prob, rule, stressed_copies)

    monkeypatch.setattr(evaluate, "choose_threshold", spy)
    evaluate.cross_fit_stressed(y, p, stressed, repeats=1)
    assert fitted_on and set(fitted_on) <= {0, len(stressed) - 1}  # never the held-out stress among the fitted
    monkeypatch.undo()
    table = cross_fit_stressed(y, p, stressed, repeats=4)
    assert set(table) == {"margin", "youden", "stressed_margin", "stressed_youden", "stressed_minimax"}
    for row in table.values():
        assert 0.9 < row["clean_balanced_accuracy"] <= 1.0
        assert 0.5 < row["worst_stress_balanced_accuracy"] < row["clean_balanced_accuracy"]  # the stresses cost
    # fitted to the other stresses, the threshold keeps more of the held-out stress's normals
    assert table["stressed_margin"]["stressed_specificity"] > table["margin"]["stressed_specificity"] + 0.05
    assert cross_fit_stressed(y, p, {"only": p}) == {}  # one stress leaves nothing to fit on when it is held out


def test_scores_meet_the_threshold_in_float64_as_serving_compares_them() -> None:
    """A float32 score a hair below a float64 threshold is NORMAL in evaluation as in serving, where the score is
    cast to float64 first (compared in float32, the threshold would round down onto the score)."""
    from cxr_model.evaluate import called_pneumonia

    y = np.array([0, 1])
    p = np.array([0.5, 0.9], dtype=np.float32)
    t = 0.50000001  # float32(t) == 0.5
    assert not called_pneumonia(p, t)[0] and bool(p.astype("float64")[0] >= t) is False  # serving's comparison
    assert binary_metrics(y, p, t)["specificity"] == 1.0


def test_degenerate_rules_answer_alike_or_refuse() -> None:
    y = np.array([0, 1, 0, 1])
    for flat in (1.0, 0.7):  # a model that ranks nothing: Youden's best is to call nothing PNEUMONIA
        p = np.full(4, flat, dtype=np.float32)
        t = choose_threshold(y, p, "youden")
        assert binary_metrics(y, p, t)["sensitivity"] == 0.0, flat
    with pytest.raises(ValueError, match="NaN"):
        choose_threshold(y, np.array([0.1, np.nan, 0.2, 0.9]), "margin")


def test_minimax_threshold_holds_the_worst_copy_best_and_sits_mid_plateau() -> None:
    from cxr_model.evaluate import minimax_threshold

    y = np.array([0, 0, 1, 1])
    clean, stressed = np.array([0.1, 0.2, 0.8, 0.9]), np.array([0.1, 0.6, 0.8, 0.9])
    # clean alone: every threshold in (0.2, 0.8) is perfect; the middle in logit space is 0.5
    assert minimax_threshold(y, [clean]) == pytest.approx(0.5)
    # the stressed copy moves a normal to 0.6: only (0.6, 0.8) is perfect for both
    t = minimax_threshold(y, [clean, stressed])
    assert 0.6 < t < 0.8
    assert t == pytest.approx(1 / (1 + np.exp(-(np.log(0.6 / 0.4) + np.log(0.8 / 0.2)) / 2)))
    # the rule's name in a run's config reaches it, with the clean scores first among the copies
    assert choose_threshold(y, clean, "stressed_minimax", [stressed]) == pytest.approx(t)
    with pytest.raises(ValueError, match="NaN"):
        minimax_threshold(y, [np.array([0.1, np.nan, 0.8, 0.9])])
    with pytest.raises(ValueError, match="both classes"):
        minimax_threshold(np.ones(4), [clean])
    with pytest.raises(ValueError, match="one score per label"):
        minimax_threshold(y, [clean[:3]])


def test_minimax_threshold_maximises_the_worst_balanced_accuracy() -> None:
    from cxr_model.evaluate import called_pneumonia, minimax_threshold

    y, p, stressed = _shifted_normals(2)
    copies = [p, *stressed.values()]

    def worst(t):
        return min((called_pneumonia(c, t)[y == 1].mean() + (~called_pneumonia(c, t)[y == 0]).mean()) / 2
                   for c in copies)

    grid = _sigmoid(np.linspace(-8, 8, 4001))
    best = max(worst(t) for t in grid)
    t = minimax_threshold(y, copies, tolerance=0.0)
    assert worst(t) == pytest.approx(best)
    # pooled margin answers to the mild stresses too; the strongest shift costs it more than it costs minimax
    assert worst(t) > worst(choose_threshold(y, p, "stressed_margin", list(stressed.values())))
