"""Figures a person reads: class counts, sample grids, augmentations, learning curves, evaluation."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless; set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from cxr_model.data import CLASSES  # noqa: E402
from cxr_model.evaluate import (  # noqa: E402
    CALIBRATION_BINS,
    brier_score,
    calibration_bins,
    called_pneumonia,
    expected_calibration_error,
)


def class_counts(manifest: pd.DataFrame) -> Figure:
    """Seaborn countplot of NORMAL/PNEUMONIA per split, with the counts written on the bars."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    order = [s for s in ("train", "val", "test") if s in set(manifest["split"])]
    sns.countplot(data=manifest, x="split", hue="class_name", order=order, hue_order=list(CLASSES), ax=ax)
    for container in ax.containers:
        ax.bar_label(container, fontsize=9)
    ax.set(title="Images per split and class", xlabel="split", ylabel="images")
    ax.legend(title="class")
    fig.tight_layout()
    return fig


def image_grid(images: np.ndarray, titles: list[str], columns: int = 4, title: str = "") -> Figure:
    """Grayscale images (N, S, S, 1) in a grid with one caption each."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.9 * rows), squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, caption in zip(axes.ravel(), images, titles, strict=False):
        ax.imshow(np.asarray(img)[..., 0], cmap="gray", vmin=0, vmax=255)
        ax.set_title(caption, fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def learning_curves(history: dict[str, list[float]]) -> Figure:
    """Loss and AUC per epoch for train and validation."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("loss", "auc"), strict=True):
        for prefix, style in (("", "-o"), ("val_", "--o")):
            values = history.get(prefix + key)
            if values:
                ax.plot(range(1, len(values) + 1), values, style, label=f"{'val' if prefix else 'train'} {key}")
        ax.set(xlabel="epoch", ylabel=key, title=key.upper() if key == "auc" else key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def confusion(y_true: np.ndarray, y_prob: np.ndarray, threshold: float, title: str) -> Figure:
    y_pred = called_pneumonia(y_prob, threshold).astype(int)
    cm = skm.confusion_matrix(np.asarray(y_true).astype(int), y_pred, labels=[0, 1])
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    sns.heatmap(cm, annot=True, fmt="d", cmap="Blues", cbar=False, xticklabels=CLASSES, yticklabels=CLASSES, ax=ax)
    ax.set(xlabel="predicted", ylabel="true", title=f"{title} (threshold {threshold:.3f})")
    fig.tight_layout()
    return fig


def roc(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    """ROC curves of several splits: {name: (y_true, y_prob)}."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y_true, y_prob) in curves.items():
        if len(np.unique(y_true)) < 2:
            continue
        fpr, tpr, _ = skm.roc_curve(y_true, y_prob)
        ax.plot(fpr, tpr, label=f"{name} (AUC {skm.roc_auc_score(y_true, y_prob):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def calibration(curves: dict[str, tuple[np.ndarray, np.ndarray]], threshold: float,
                bins: int = CALIBRATION_BINS) -> Figure:
    """Reliability diagram of several splits, {name: (y_true, y_prob)}: per score bin, the fraction of PNEUMONIA
    against the mean score (on the diagonal where the score is a probability), and below it how the scores
    spread over the bins, with the run's threshold on both."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.8), sharex=True, height_ratios=(3, 1.4),
                                      layout="constrained")
    edges = np.linspace(0.0, 1.0, bins + 1)
    top.plot([0, 1], [0, 1], ":", color="grey", label="calibrated")
    for name, (y_true, y_prob) in curves.items():
        if not len(y_prob):
            continue
        rows = calibration_bins(y_true, y_prob, bins)
        line, = top.plot([r["mean_score"] for r in rows], [r["fraction_pneumonia"] for r in rows], "-o", markersize=4,
                         label=f"{name} (ECE {expected_calibration_error(y_true, y_prob, bins):.3f}, "
                               f"Brier {brier_score(y_true, y_prob):.3f})")
        bottom.hist(np.ravel(y_prob), bins=edges, histtype="step", color=line.get_color(), label=name)
    for ax in (top, bottom):
        ax.axvline(threshold, color="black", linestyle="--", linewidth=0.8)
        ax.grid(alpha=0.3)
    top.set(ylabel="fraction PNEUMONIA", title=f"Calibration (threshold {threshold:.3f}, dashed)", xlim=(0, 1),
            ylim=(0, 1))
    top.legend(loc="upper left", fontsize=8)
    bottom.set(xlabel="score (probability of PNEUMONIA)", ylabel="images", yscale="log")
    return fig


def gradcam_grid(images: np.ndarray, heatmaps: np.ndarray, titles: list[str], columns: int = 4) -> Figure:
    """Each image with its Grad-CAM heatmap overlaid (red: where the evidence for the model's answer is)."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 3.3 * rows), squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, cam, caption in zip(axes.ravel(), images, heatmaps, titles, strict=False):
        ax.imshow(np.asarray(img)[..., 0], cmap="gray", vmin=0, vmax=255)
        ax.imshow(cam, cmap="jet", alpha=0.35, vmin=0, vmax=1)
        ax.set_title(caption, fontsize=9)
    fig.suptitle("Grad-CAM on fixed test images: where the evidence for the model's answer is")
    return fig


def adaptation_scores(scores: dict[str, np.ndarray], thresholds: dict[str, float]) -> Figure:
    """One histogram of the site's scores per adaptation step (unadapted, calibrated, ...), its threshold drawn."""
    fig, axes = plt.subplots(1, len(scores), figsize=(3.6 * len(scores), 3.4), sharey=True, squeeze=False)
    for ax, (step, p) in zip(axes[0], scores.items(), strict=True):
        ax.hist(np.asarray(p, dtype=np.float64), bins=20, range=(0, 1), color="#4c72b0")
        if step in thresholds:
            ax.axvline(thresholds[step], color="#c44e52", ls="--", label=f"threshold {thresholds[step]:.3f}")
            ax.legend(fontsize=8, loc="upper center")
        ax.set(title=step, xlabel="P(PNEUMONIA)")
    axes[0][0].set_ylabel("films")
    fig.suptitle("The site's films, scored after each adaptation step")
    fig.tight_layout()
    return fig


def em_convergence(history: list[float], source_prior: float, interval: tuple[float, float] | None) -> Figure:
    """The EM estimate of the site's PNEUMONIA share after each step, from the training share."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(range(len(history) + 1), [source_prior, *history], marker=".", label="EM estimate")
    ax.axhline(source_prior, color="grey", ls=":", label=f"training share {source_prior:.3f}")
    if interval:
        ax.axhspan(*interval, color="#55a868", alpha=0.2, label=f"bootstrap 95 % {interval[0]:.3f}-{interval[1]:.3f}")
    ax.set(xlabel="EM step", ylabel="PNEUMONIA share", ylim=(0, 1), title="Class prior of the site (EM)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
