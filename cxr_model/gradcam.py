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


def _logit(model: keras.Model, probe_outputs: list) -> tuple[list, callable]:
    """Probe outputs that give the model's logit, and how to compute it from them.

    A final sigmoid Dense layer (every convnet here) is undone exactly: its input times its kernel plus its bias.
    Any other model: the logit of its probability, clipped away from 0 and 1.
    """
    head = model.layers[-1]
    if isinstance(head, keras.layers.Dense) and head.activation is keras.activations.sigmoid:
        def logit(h):
            z = tf.matmul(h, head.kernel)
            return (z + head.bias if head.use_bias else z)[:, 0]
        return [*probe_outputs, head.input], logit

    def logit_of_probability(p):
        p = tf.clip_by_value(p[:, 0], 1e-7, 1 - 1e-7)
        return tf.math.log(p) - tf.math.log1p(-p)
    return [*probe_outputs, model.outputs[0]], logit_of_probability


def _gradcam(model: keras.Model, images: np.ndarray, layer_name: str | None, classes: np.ndarray) -> np.ndarray:
    layer = model.get_layer(layer_name or last_feature_layer(model))
    outputs, logit = _logit(model, [layer.output])
    probe = keras.Model(model.inputs, outputs)
    x = tf.convert_to_tensor(np.asarray(images, dtype="float32"))
    sign = tf.constant(np.where(classes == 1, 1.0, -1.0), tf.float32)  # (N,)
    with tf.GradientTape() as tape:
        features, head_input = probe(x, training=False)  # (N, h, w, C), the logit's input
        tape.watch(features)
        score = sign * logit(head_input)  # (N,): evidence for each image's class
    grads = tape.gradient(score, features)  # d score / d features, (N, h, w, C)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # (N, 1, 1, C): channel importance
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))  # (N, h, w)
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    cam = tf.math.divide_no_nan(cam, peak)
    side = images.shape[1]
    return tf.image.resize(cam[..., None], (side, side), method="bilinear")[..., 0].numpy()  # (N, S, S)
