"""Grad-CAM comes from the model's own gradients: checked on a model whose answer is known."""

from __future__ import annotations

import keras
import numpy as np

from cxr_model.gradcam import gradcam, last_feature_layer
from cxr_model.model import ConvNetConfig, build_convnet, mean_ensemble


def _known_model(sign: float) -> keras.Model:
    """conv (all-ones kernel) -> ReLU -> GAP -> dense(sign): the score grows with bright pixels."""
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(2, 3, padding="same", kernel_initializer="ones", bias_initializer="zeros",
                            name="conv")(inputs)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", kernel_initializer=keras.initializers.Constant(sign))(x)
    return keras.Model(inputs, outputs)


def _left_bright() -> np.ndarray:
    img = np.zeros((1, 16, 16, 1), "float32")
    img[:, :, :8] = 1.0
    return img


def test_heatmap_follows_the_evidence() -> None:
    cam = gradcam(_known_model(+1.0), _left_bright())
    assert cam.shape == (1, 16, 16)
    assert cam[0, :, :6].mean() > 0.5 and cam[0, :, 10:].mean() < 0.05
    assert cam.min() >= 0.0 and cam.max() <= 1.0 + 1e-6


def test_heatmap_uses_the_gradient_sign() -> None:
    # Bright pixels now lower the pneumonia score: nothing supports it, so the map is empty.
    cam = gradcam(_known_model(-1.0), _left_bright())
    assert np.allclose(cam, 0.0)


def test_picks_last_spatial_layer_of_the_convnet() -> None:
    model = build_convnet(ConvNetConfig(image_size=64, blocks=3, filters=8))
    name = last_feature_layer(model)
    assert name == "block3_1_relu" and model.get_layer(name).output.shape[1] == 8
    cam = gradcam(model, np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 1)))
    assert cam.shape == (2, 64, 64) and np.isfinite(cam).all()


def test_ensemble_heatmap_is_the_mean_of_its_members() -> None:
    cfg = ConvNetConfig(image_size=64, blocks=3, filters=8)
    first, second = build_convnet(cfg), build_convnet(cfg)
    images = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 1))
    same = mean_ensemble(cfg, [first.get_weights(), first.get_weights()])
    np.testing.assert_allclose(gradcam(same, images), gradcam(first, images), atol=1e-5)
    mixed = gradcam(mean_ensemble(cfg, [first.get_weights(), second.get_weights()]), images)
    np.testing.assert_allclose(mixed, (gradcam(first, images) + gradcam(second, images)) / 2, atol=1e-5)
    assert not np.allclose(mixed, gradcam(first, images), atol=1e-3)  # the second member counts
