"""The evaluate task's figures, on a tiny model and synthetic images (Prefect and MLflow imported, not run)."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd

from cxr_model.cache import DecodedImages
from cxr_model.gradcam import gradcam
from cxr_model.model import ConvNetConfig, build_convnet
from cxr_pneumonia.tasks.evaluate import gradcam_figure


def test_figure_maps_explain_each_images_answer_at_the_threshold() -> None:
    keras.utils.set_random_seed(3)
    model = build_convnet(ConvNetConfig(image_size=32, blocks=2, filters=8))
    images = np.random.default_rng(4).integers(0, 256, (4, 32, 32, 1)).astype("uint8")
    test = pd.DataFrame(dict(sha256=list("abcd"), path=[f"/x/{k}.jpeg" for k in "abcd"], label=[0, 0, 1, 1],
                             class_name=["NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA"]))
    p_test = np.array([0.2, 0.7, 0.4, 0.9])  # at 0.5: NORM, PNEU, NORM, PNEU
    fig = gradcam_figure(model, test, DecodedImages(list("abcd"), images), p_test, threshold=0.5, per_class=2)
    shown = np.stack([ax.images[1].get_array() for ax in fig.axes if len(ax.images) == 2])  # (4, 32, 32)
    answers = np.array([0, 1, 0, 1])
    np.testing.assert_allclose(shown, gradcam(model, images, classes=answers), atol=1e-6)
    assert not np.allclose(shown, gradcam(model, images), atol=1e-3)  # not the pneumonia map of every image
    assert [ax.get_title().split("\n")[0][-4:] for ax in fig.axes[:4]] == ["NORM", "PNEU", "NORM", "PNEU"]
