"""Grad-CAM comes from the model's own gradients: checked on a model whose answer is known."""

from __future__ import annotations

import keras
import numpy as np
import pytest

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
    # members of other architectures (`--top-trials`): each member's map from its own last feature layer
    deeper = ConvNetConfig(image_size=64, blocks=4, filters=8, dense_units=0)
    third = build_convnet(deeper)
    assert last_feature_layer(third) != last_feature_layer(first)
    across = gradcam(mean_ensemble([cfg, deeper], [first.get_weights(), third.get_weights()]), images)
    np.testing.assert_allclose(across, (gradcam(first, images) + gradcam(third, images)) / 2, atol=1e-5)


def test_normal_map_shows_the_evidence_for_normal() -> None:
    # Bright pixels lower the pneumonia score, so they are the evidence for NORMAL.
    cam = gradcam(_known_model(-1.0), _left_bright(), classes=np.array([0]))
    assert cam[0, :, :6].mean() > 0.5 and cam[0, :, 10:].mean() < 0.05
    assert np.allclose(gradcam(_known_model(+1.0), _left_bright(), classes=np.array([0])), 0.0)
    both = gradcam(_known_model(+1.0), np.concatenate([_left_bright()] * 2), classes=np.array([1, 0]))
    assert both[0].max() == pytest.approx(1.0) and np.allclose(both[1], 0.0)  # each image its own class


def test_confident_scores_still_have_a_map() -> None:
    # p rounds to exactly 1.0 in float32: the probability has no gradient left, the logit does.
    model = _known_model(+50.0)
    assert float(model(_left_bright())[0, 0]) == 1.0
    cam = gradcam(model, _left_bright())
    assert cam[0, :, :6].mean() > 0.5 and cam[0, :, 10:].mean() < 0.05
    keras.utils.set_random_seed(0)
    convnet = build_convnet(ConvNetConfig(image_size=64, blocks=3, filters=8))
    head = convnet.get_layer("pneumonia")
    head.kernel.assign(head.kernel * 1e6)  # saturates every score
    images = np.random.default_rng(2).uniform(0, 255, (3, 64, 64, 1))
    p = np.asarray(convnet(images))[:, 0]
    assert np.isin(p, (0.0, 1.0)).all()
    cam = gradcam(convnet, images, classes=(p > 0.5).astype(int))
    assert (cam.max(axis=(1, 2)) > 0.5).all()  # the upsampled peak; a probability gradient would leave 0


def test_classes_must_be_one_label_per_image() -> None:
    with pytest.raises(ValueError, match="one 0"):
        gradcam(_known_model(1.0), _left_bright(), classes=np.array([1, 0]))
    with pytest.raises(ValueError, match="one 0"):
        gradcam(_known_model(1.0), _left_bright(), classes=np.array([2]))



def test_a_model_loaded_from_its_keras_file_keeps_the_logit_map(tmp_path) -> None:
    keras.utils.set_random_seed(5)
    cfg = ConvNetConfig(image_size=64, blocks=3, filters=8)
    model = mean_ensemble(cfg, [build_convnet(cfg).get_weights(), build_convnet(cfg).get_weights()])
    for member in (model.get_layer("member1"), model.get_layer("member2")):
        head = member.get_layer("pneumonia")
        head.kernel.assign(head.kernel * 1e6)  # saturates every score
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
    images = np.random.default_rng(6).uniform(0, 255, (2, 64, 64, 1))
    cam = gradcam(loaded, images, classes=np.array([1, 0]))
    assert (cam.max(axis=(1, 2)) > 0.25).all()  # each member's map of the logit survives the save
    np.testing.assert_allclose(cam, gradcam(model, images, classes=np.array([1, 0])), atol=1e-5)


def test_a_model_without_a_sigmoid_dense_head_is_refused() -> None:
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(2, 3, padding="same", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Activation("sigmoid")(keras.layers.Dense(1)(x))
    with pytest.raises(ValueError, match="sigmoid"):
        gradcam(keras.Model(inputs, outputs), _left_bright())
