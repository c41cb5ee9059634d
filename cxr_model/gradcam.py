"""Grad-CAM: where in the image the convnet's pneumonia score comes from (Selvaraju et al., 2017)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from cxr_model.model import ensemble_members


def last_feature_layer(model: keras.Model) -> str:
    """Name of the last non-pooling layer with a spatial (B, H, W, C) output: the finest late features."""
    skip = (keras.layers.InputLayer, keras.layers.MaxPooling2D)
    spatial = [layer.name for layer in model.layers
               if len(layer.output.shape) == 4 and not isinstance(layer, skip) and layer.output.shape[1] > 1]
    if not spatial:
        raise ValueError(f"model {model.name} has no spatial layer for Grad-CAM")
    return spatial[-1]


def gradcam(model: keras.Model, images: np.ndarray, layer_name: str | None = None) -> np.ndarray:
    """Heatmaps (N, S, S) in [0, 1] for raw (N, S, S, 1) images, upsampled to the input size.

    For an ensemble (`cxr_model.model.mean_ensemble`) the map is the mean of its members' maps: the
    ensemble's score is their mean, so each member's evidence counts the same, and where they disagree the map
    is fainter.
    """
    members = ensemble_members(model)
    if len(members) > 1:
        return np.mean([_gradcam(m, images, layer_name) for m in members], axis=0)
    return _gradcam(model, images, layer_name)


def _gradcam(model: keras.Model, images: np.ndarray, layer_name: str | None = None) -> np.ndarray:
    layer = model.get_layer(layer_name or last_feature_layer(model))
    probe = keras.Model(model.inputs, [layer.output, model.outputs[0]])
    x = tf.convert_to_tensor(np.asarray(images, dtype="float32"))
    with tf.GradientTape() as tape:
        features, prob = probe(x, training=False)  # (N, h, w, C), (N, 1)
        score = prob[:, 0]
    grads = tape.gradient(score, features)  # d score / d features, (N, h, w, C)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # (N, 1, 1, C): channel importance
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))  # (N, h, w)
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    cam = tf.math.divide_no_nan(cam, peak)
    side = images.shape[1]
    return tf.image.resize(cam[..., None], (side, side), method="bilinear")[..., 0].numpy()  # (N, S, S)
