"""Grad-CAM: where in the image the evidence for the convnet's answer is (Selvaraju et al., 2017)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from cxr_model.model import BlurPool2D, ensemble_members


def last_feature_layer(model: keras.Model) -> str:
    """Name of the last non-pooling layer with a spatial (B, H, W, C) output: the finest late features."""
    skip = (keras.layers.InputLayer, keras.layers.MaxPooling2D, BlurPool2D)
    spatial = [layer.name for layer in model.layers
               if len(layer.output.shape) == 4 and not isinstance(layer, skip) and layer.output.shape[1] > 1]
    if not spatial:
        raise ValueError(f"model {model.name} has no spatial layer for Grad-CAM")
    return spatial[-1]


def gradcam(model: keras.Model, images: np.ndarray, layer_name: str | None = None,
            classes: np.ndarray | None = None) -> np.ndarray:
    """Heatmaps (N, S, S) in [0, 1] for raw (N, S, S, 1) images, upsampled to the input size.

    `classes` (N,) says which answer each map explains: 1 = PNEUMONIA (the default for every image), 0 =
    NORMAL. The map of an image is Grad-CAM of its logit, negated for NORMAL: a normal image's map shows what
    speaks for NORMAL, instead of the few faint places that speak for PNEUMONIA, stretched to full scale.
    The logit, not the probability, so a confident score (p = 1.0 in float32) still has a gradient.

    For an ensemble (`cxr_model.model.mean_ensemble`) the map is the mean of its members' maps: the
    ensemble's score is their mean, so each member's evidence counts the same, and where they disagree the map
    is fainter.
    """
    classes = np.ones(len(images)) if classes is None else np.asarray(classes)
    if classes.shape != (len(images),) or not np.isin(classes, (0, 1)).all():
        raise ValueError(f"classes must be one 0 (NORMAL) or 1 (PNEUMONIA) per image, got {classes!r}")
    members = ensemble_members(model)
    if len(members) > 1:
        return np.mean([_gradcam(m, images, layer_name, classes) for m in members], axis=0)
    return _gradcam(model, images, layer_name, classes)


def _logit_head(model: keras.Model) -> keras.layers.Dense:
    """The final Dense layer with a sigmoid, whose pre-activation (input @ kernel + bias) is the logit."""
    head = model.layers[-1]
    if not (isinstance(head, keras.layers.Dense) and head.get_config()["activation"] == "sigmoid"):
        raise ValueError(f"Grad-CAM needs a model that ends in a Dense layer with a sigmoid activation; "
                         f"{model.name} ends in {type(head).__name__} {head.name!r}")
    return head


def _gradcam(model: keras.Model, images: np.ndarray, layer_name: str | None, classes: np.ndarray) -> np.ndarray:
    layer = model.get_layer(layer_name or last_feature_layer(model))
    head = _logit_head(model)
    probe = keras.Model(model.inputs, [layer.output, head.input])
    x = tf.convert_to_tensor(np.asarray(images, dtype="float32"))
    sign = tf.constant(np.where(classes == 1, 1.0, -1.0), tf.float32)  # (N,)
    with tf.GradientTape() as tape:
        features, head_input = probe(x, training=False)  # (N, h, w, C), (N, D): the logit's input
        logit = tf.matmul(head_input, head.kernel)[:, 0]  # (N,) the sigmoid's argument
        if head.use_bias:
            logit += head.bias[0]
        score = sign * logit  # (N,): evidence for each image's answer
    grads = tape.gradient(score, features)  # d score / d features, (N, h, w, C)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # (N, 1, 1, C): channel importance
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))  # (N, h, w)
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    cam = tf.math.divide_no_nan(cam, peak)
    side = images.shape[1]
    return tf.image.resize(cam[..., None], (side, side), method="bilinear")[..., 0].numpy()  # (N, S, S)
