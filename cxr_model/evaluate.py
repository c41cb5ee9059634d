"""Threshold choice on validation and the test metrics computed once with that threshold."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from sklearn import metrics as skm

from cxr_model.config import CLEAN_RULES, STRESSED_RULES, THRESHOLD_RULES

ALIASES = {"balanced_accuracy": "youden"}  # the same optimum under the name some readers know it by

__all__ = ["CLEAN_RULES", "STRESSED_RULES", "THRESHOLD_RULES", "binary_metrics", "calibration_bins",
           "brier_score", "choose_threshold", "classification_report", "cross_fit_rules", "cross_fit_stressed",
           "expected_calibration_error", "margin_threshold", "minimax_threshold", "STRESS_CV_RULES"]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def called_pneumonia(y_prob, threshold: float) -> np.ndarray:
    """True where a score is at or above the threshold, compared in float64 as serving compares them (a float32
    score and a float64 threshold would otherwise meet in float32, and disagree with serving within one step)."""
    return np.asarray(y_prob, dtype=np.float64) >= float(threshold)


def margin_threshold(y_true: np.ndarray, y_prob: np.ndarray, tail: float = 0.05) -> float:
    """Midpoint, in logit space, between the top `tail` quantile of NORMAL scores and the bottom of PNEUMONIA.

    On a validation split the classes barely overlap, so the thresholds with the best validation score form a
    wide interval and Youden's J lands on whichever single image sits at its edge. This rule puts the boundary
    in the middle of the gap, measured on quantiles rather than on single images: it moves little when one
    image changes, and leaves the same room for drift on both sides.
    """
    y_true = np.asarray(y_true).astype(int)
    if np.isnan(np.asarray(y_prob, dtype=np.float64)).any():
        raise ValueError("Input contains NaN: the margin rule needs a score for every image")
    z = _logit(y_prob)
    upper_normal = np.quantile(z[y_true == 0], 1 - tail)
    lower_pneumonia = np.quantile(z[y_true == 1], tail)
    return float(1 / (1 + np.exp(-(upper_normal + lower_pneumonia) / 2)))


# balanced accuracy: in a validation half of ~95 NORMAL and ~275 PNEUMONIA images, one NORMAL image weighs 0.0053
# and one PNEUMONIA image 0.0018, so the near-best run can pass about two PNEUMONIA images and no NORMAL one
MINIMAX_TOLERANCE = 0.005


def minimax_threshold(y_true: np.ndarray, copies: Sequence[np.ndarray], tolerance: float = MINIMAX_TOLERANCE) -> float:
    """The threshold whose worst balanced accuracy over `copies` (score arrays for the same labels) is highest.

    Pooling the stressed copies (`stressed_margin`) lets the mild stresses, which are most of the pool, outvote
    the one that shifts scores most; this rule answers to the worst copy instead. Balanced accuracy is a step
    function of the threshold, so its maximin is a plateau whose edges are single images: every candidate within
    `tolerance` of the best worst-case next to the best one is kept, and the rule takes the middle, in logit space,
    of the lowest and highest of them. Unlike `margin_threshold`'s middle of the gap, this leans towards
    PNEUMONIA where the classes are unequal in number: missing one image of the larger class costs less balanced
    accuracy, so the tolerance reaches further past those (see `MINIMAX_TOLERANCE`).
    """
    y_true = np.asarray(y_true).astype(int).ravel()
    copies = [np.asarray(c, dtype=np.float64).ravel() for c in copies]
    if not copies or len(np.unique(y_true)) < 2:
        raise ValueError("The minimax rule needs at least one copy of scores and both classes among the labels")
    if any(len(c) != len(y_true) for c in copies):
        raise ValueError(f"Each copy needs one score per label ({len(y_true)}), got {[len(c) for c in copies]}")
    if any(np.isnan(c).any() for c in copies):
        raise ValueError("Input contains NaN: the minimax rule needs a score for every image")
    logits = [_logit(c) for c in copies]
    # one candidate between each pair of neighbouring scores (and one beyond each end), so that no candidate sits
    # on an image's own score: every threshold between two neighbours calls the same images
    z = np.unique(np.concatenate(logits))
    candidates = np.concatenate([[z[0] - 1.0], (z[:-1] + z[1:]) / 2, [z[-1] + 1.0]])
    positives, negatives = (y_true == 1).sum(), (y_true == 0).sum()
    worst = np.full(len(candidates), np.inf)
    for c in logits:
        # called PNEUMONIA where the score is above the candidate: counted per class through sorted scores
        sens = 1 - np.searchsorted(np.sort(c[y_true == 1]), candidates) / positives
        spec = np.searchsorted(np.sort(c[y_true == 0]), candidates) / negatives
        worst = np.minimum(worst, (sens + spec) / 2)
    # the run of near-best candidates around the best one; a second run elsewhere would put the middle in a valley
    best, near = int(np.argmax(worst)), worst >= worst.max() - tolerance
    low, high = best, best
    while low > 0 and near[low - 1]:
        low -= 1
    while high < len(near) - 1 and near[high + 1]:
        high += 1
    return float(1 / (1 + np.exp(-(candidates[low] + candidates[high]) / 2)))


def choose_threshold(y_true: np.ndarray, y_prob: np.ndarray, rule: str = "margin",
                     stressed: Sequence[np.ndarray] = ()) -> float:
    """Pick the decision threshold on validation data.

    margin: the middle of the gap between the classes (see `margin_threshold`); youden: max sensitivity +
    specificity - 1; balanced_accuracy: the same optimum, kept as an alias for readers who know it by that
    name; f1: max F1 of the PNEUMONIA class. stressed_margin and stressed_youden apply margin or youden to the
    scores of the same images clean and under each stress in `stressed` (arrays of probabilities aligned with
    `y_prob`, see `cxr_model.stress`), pooled: the threshold is fitted to the scanners the stresses model as
    well as to the one validation came from. stressed_youden maximises balanced accuracy averaged over the
    clean and stressed copies; stressed_minimax maximises the worst of their balanced accuracies
    (`minimax_threshold`).
    """
    y_true = np.asarray(y_true).astype(int)
    if len(np.unique(y_true)) < 2:
        return 0.5  # a one-class validation set carries no information about the threshold
    if rule in STRESSED_RULES:
        if not len(stressed):
            raise ValueError(f"Threshold rule {rule!r} needs the stressed validation scores (cxr_model.stress)")
        if any(len(p) != len(y_prob) for p in stressed):
            raise ValueError(f"Each stressed copy needs one score per validation image ({len(y_prob)}), got "
                             f"{[len(p) for p in stressed]}")
        if rule == "stressed_minimax":
            return minimax_threshold(y_true, [y_prob, *stressed])
        y_prob = np.concatenate([np.asarray(y_prob), *map(np.asarray, stressed)])
        y_true, rule = np.tile(y_true, 1 + len(stressed)), rule.removeprefix("stressed_")
    if rule == "margin":
        return margin_threshold(y_true, y_prob)
    rule = ALIASES.get(rule, rule)
    if rule == "youden":
        fpr, tpr, thresholds = skm.roc_curve(y_true, y_prob)
        best = int(np.argmax(tpr - fpr))
        # sklearn's first point (threshold inf) calls nothing positive: just above 1 keeps that meaning
        return float(np.clip(thresholds[best], 0.0, np.nextafter(1.0, 2.0)))
    if rule == "f1":
        precision, recall, thresholds = skm.precision_recall_curve(y_true, y_prob)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        return float(thresholds[int(np.argmax(f1))])
    raise ValueError(f"Unknown threshold rule {rule!r}")


def cross_fit_rules(
    y_true: np.ndarray, y_prob: np.ndarray, rules=CLEAN_RULES, repeats: int = 50, seed: int = 0
) -> dict[str, dict[str, float]]:
    """How well each rule's threshold carries over to unseen images, measured on validation alone.

    Split validation into two stratified halves `repeats` times, pick the threshold on one half and score
    the other (2 x `repeats` fits): mean held-out balanced accuracy, and the spread (sd) of the chosen
    threshold in logit units.
    """
    from sklearn.model_selection import RepeatedStratifiedKFold

    y_true, y_prob = np.asarray(y_true).astype(int), np.asarray(y_prob)
    if min(np.bincount(y_true, minlength=2)) < 4:
        return {}
    folds = RepeatedStratifiedKFold(n_splits=2, n_repeats=repeats, random_state=seed)
    fitted = list(dict.fromkeys(ALIASES.get(r, r) for r in rules))  # an alias is fitted once
    scores: dict[str, list[float]] = {r: [] for r in fitted}
    logits: dict[str, list[float]] = {r: [] for r in fitted}
    for fit, held in folds.split(y_prob, y_true):
        y_held, p_held = y_true[held], y_prob[held]
        for rule in fitted:
            t = choose_threshold(y_true[fit], y_prob[fit], rule)
            scores[rule].append(_rates(y_held, p_held, t)[0])
            logits[rule].append(float(_logit(np.array([t]))[0]))
    return {r: {"balanced_accuracy": float(np.mean(scores[ALIASES.get(r, r)])),
                "threshold_logit_sd": float(np.std(logits[ALIASES.get(r, r)]))} for r in rules}


def _rates(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """(balanced accuracy, sensitivity, specificity) at `threshold`; both classes must be present."""
    predicted = called_pneumonia(y_prob, threshold)
    sensitivity, specificity = predicted[y_true == 1].mean(), (~predicted[y_true == 0]).mean()
    return (sensitivity + specificity) / 2, sensitivity, specificity


STRESS_CV_RULES = ("margin", "youden", *STRESSED_RULES)  # the rules `cross_fit_stressed` compares by default


def cross_fit_stressed(
    y_true: np.ndarray, y_prob: np.ndarray, stressed: Mapping[str, np.ndarray],
    rules: Sequence[str] = STRESS_CV_RULES, repeats: int = 20, seed: int = 0,
) -> dict[str, dict[str, float]]:
    """How each rule's threshold carries over to unseen images under a shift it was not fitted to.

    Validation alone: split it into stratified halves `repeats` times; for every stress in turn, fit each rule
    on one half (the stressed_ rules on the clean scores and every *other* stress) and score the other half
    under the held-out stress, and clean. Returns per rule the mean over repeats and held-out stresses of
    balanced accuracy, sensitivity and specificity, the worst stress's mean balanced accuracy, and the clean
    held-out balanced accuracy.
    """
    from sklearn.model_selection import RepeatedStratifiedKFold

    y_true, y_prob = np.asarray(y_true).astype(int), np.asarray(y_prob)
    stressed = {k: np.asarray(v) for k, v in stressed.items()}
    if min(np.bincount(y_true, minlength=2)) < 4 or len(stressed) < 2:
        return {}

    folds = RepeatedStratifiedKFold(n_splits=2, n_repeats=repeats, random_state=seed)
    rows: dict[str, dict[str, list]] = {r: {"ba": [], "sens": [], "spec": [], "clean": []} for r in rules}
    per_stress: dict[str, dict[str, list]] = {r: {s: [] for s in stressed} for r in rules}
    for fit, held in folds.split(y_prob, y_true):
        # a clean rule does not see the stresses: one fit per halving serves every held-out stress
        clean = {r: choose_threshold(y_true[fit], y_prob[fit], r) for r in rules if r not in STRESSED_RULES}
        for out in stressed:
            others = [p[fit] for s, p in stressed.items() if s != out]
            for rule in rules:
                t = clean[rule] if rule in clean else choose_threshold(y_true[fit], y_prob[fit], rule, others)
                ba, sens, spec = _rates(y_true[held], stressed[out][held], t)
                for key, value in (("ba", ba), ("sens", sens), ("spec", spec),
                                   ("clean", _rates(y_true[held], y_prob[held], t)[0])):
                    rows[rule][key].append(value)
                per_stress[rule][out].append(ba)
    return {r: {"stressed_balanced_accuracy": float(np.mean(v["ba"])),
                "stressed_sensitivity": float(np.mean(v["sens"])), "stressed_specificity": float(np.mean(v["spec"])),
                "worst_stress_balanced_accuracy": float(min(np.mean(b) for b in per_stress[r].values())),
                "clean_balanced_accuracy": float(np.mean(v["clean"]))} for r, v in rows.items()}


CALIBRATION_BINS = 10


def calibration_bins(y_true: np.ndarray, y_prob: np.ndarray, bins: int = CALIBRATION_BINS) -> list[dict[str, float]]:
    """The reliability table: the scores cut into `bins` equal-width bins over [0, 1] (the last one closed).

    One row per bin that holds a score: its edges, how many scores it holds, their mean, and the fraction of
    those images that are PNEUMONIA. A calibrated score has mean score = fraction in every bin.
    """
    y_true = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if np.isnan(p).any():
        raise ValueError("Input contains NaN: calibration needs a score for every image")
    index = np.clip(np.floor(p * bins), 0, bins - 1).astype(int)  # bin floor(score * bins); a score of 1 in the last
    return [dict(low=b / bins, high=(b + 1) / bins, count=int(inside.sum()),
                 mean_score=float(p[inside].mean()), fraction_pneumonia=float(y_true[inside].mean()))
            for b in range(bins) if (inside := index == b).any()]


def brier_score(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Mean squared difference between the score and the label (0 or 1); 0 is perfect, NaN without images."""
    y_true = np.asarray(y_true, dtype=np.float64).ravel()
    return float(np.mean((np.asarray(y_prob, dtype=np.float64).ravel() - y_true) ** 2)) if len(y_true) else float("nan")


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """ECE: over the bins of `calibration_bins`, the gap |mean score - fraction PNEUMONIA| weighted by the share
    of images in the bin (Naeini et al. 2015; Guo et al. 2017). 0 is calibrated; NaN without images."""
    rows, n = calibration_bins(y_true, y_prob, bins), len(np.ravel(y_prob))
    if not n:
        return float("nan")
    return float(sum(r["count"] / n * abs(r["mean_score"] - r["fraction_pneumonia"]) for r in rows))


def binary_metrics(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, precision, sensitivity, specificity, F1, ROC AUC and PR AUC at `threshold`; and how far the
    score is from a probability: the Brier score (mean squared error against the label) and the ECE."""
    y_true = np.asarray(y_true).astype(int)
    y_pred = called_pneumonia(y_prob, threshold).astype(int)
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
        "brier": brier_score(y_true, y_prob),
        "ece": expected_calibration_error(y_true, y_prob),
        "threshold": float(threshold),
    }


def classification_report(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> str:
    y_pred = called_pneumonia(y_prob, threshold).astype(int)
    return skm.classification_report(
        np.asarray(y_true).astype(int), y_pred, labels=[0, 1], target_names=["NORMAL", "PNEUMONIA"],
        digits=4, zero_division=0,
    )
