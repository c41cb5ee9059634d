"""The run's figures show the numbers they are drawn from (read back from the matplotlib artists)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxr_model import plots


def test_class_counts_labels_each_bar_with_its_count() -> None:
    manifest = pd.DataFrame(dict(split=["train"] * 5 + ["val"] * 2 + ["test"] * 3,
                                 class_name=["NORMAL", "PNEUMONIA", "PNEUMONIA", "PNEUMONIA", "NORMAL", "NORMAL",
                                             "PNEUMONIA", "NORMAL", "PNEUMONIA", "PNEUMONIA"]))
    (ax,) = plots.class_counts(manifest).axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["train", "val", "test"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    counts = {name: [int(p.get_height()) for p in c.patches] for name, c in zip(legend, ax.containers, strict=True)}
    assert counts == {"NORMAL": [2, 1, 1], "PNEUMONIA": [3, 1, 2]}
    assert [t.get_text() for t in ax.texts] == ["2", "1", "1", "3", "1", "2"]


def test_image_grid_shows_every_image_with_its_caption_and_hides_empty_cells() -> None:
    images = np.stack([np.full((8, 8, 1), 40 * i, np.uint8) for i in range(5)])
    fig = plots.image_grid(images, [f"img {i}" for i in range(5)], columns=3, title="grid")
    shown = [ax for ax in fig.axes if ax.images]
    assert len(fig.axes) == 6 and len(shown) == 5  # one empty cell, with nothing drawn
    assert [ax.get_title() for ax in shown] == [f"img {i}" for i in range(5)]
    np.testing.assert_array_equal(shown[3].images[0].get_array(), images[3][..., 0])
    assert fig._suptitle.get_text() == "grid"


def test_learning_curves_plot_each_epoch_of_train_and_validation() -> None:
    history = {"loss": [0.7, 0.5, 0.4], "val_loss": [0.8, 0.6, 0.6], "auc": [0.6, 0.8, 0.9], "val_auc": [0.5, 0.7, 0.8]}
    loss, auc = plots.learning_curves(history).axes
    for ax, key in ((loss, "loss"), (auc, "auc")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {f"train {key}", f"val {key}"}
        assert list(lines[f"val {key}"].get_ydata()) == history[f"val_{key}"]
        assert list(lines[f"train {key}"].get_xdata()) == [1, 2, 3]


def test_confusion_counts_calls_at_the_threshold() -> None:
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.1, 0.6, 0.3, 0.6, 0.59])  # at 0.6: one NORMAL called PNEUMONIA, one PNEUMONIA missed
    (ax,) = plots.confusion(y, p, 0.6, "Test").axes
    assert [t.get_text() for t in ax.texts] == ["2", "1", "1", "1"]  # TN FP / FN TP, row by row
    assert ax.get_title() == "Test (threshold 0.600)"


def test_roc_draws_one_curve_per_split_with_two_classes() -> None:
    y, p = np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9])
    (ax,) = plots.roc({"validation": (y, p), "one class": (np.ones(3), np.array([0.2, 0.5, 0.9]))}).axes
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[0] == "validation (AUC 0.750)" and not any(label.startswith("one class") for label in labels)


@pytest.fixture(autouse=True)
def _close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")
