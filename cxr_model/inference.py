"""Prediction: a graph-compiled forward pass over uint8 images, averaged over test-time views."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from cxr_model.augmentation import warp_view


def compile_forward(model: keras.Model, batch_size: int = 64,
                    views: Sequence[tuple[float, float]] = ((1.0, 1.0),)) -> Callable[[np.ndarray], np.ndarray]:
    """A graph-compiled `uint8 images (N, S, S, 1) -> probabilities (N,)`; ~10x faster than eager calls.

    With several `views` ((scale, width:height) pairs, see `config.TTA_VIEWS`) the probability is the mean over
    the views, run as one batch of len(views) x batch_size. Evaluation, the benchmarks and the served model all
    predict through this one function (Grad-CAM differentiates the model on the image alone).
    """
    size = model.input_shape[1]
    views = tuple((float(s), float(r)) for s, r in views)
    if not views:
        raise ValueError("compile_forward needs at least one view, e.g. ((1.0, 1.0),)")

    @tf.function(input_signature=[tf.TensorSpec((None, size, size, 1), tf.uint8)])  # no retracing per batch size
    def forward(images):
        x = tf.cast(images, tf.float32)
        p = model(tf.concat([warp_view(x, s, r) for s, r in views], axis=0), training=False)  # (V*B, 1)
        return tf.reduce_mean(tf.reshape(p, (len(views), -1, 1)), axis=0)  # (B, 1)

    def predict(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.uint8)
        out = [forward(images[i : i + batch_size]).numpy() for i in range(0, len(images), batch_size)]
        return np.concatenate(out).reshape(-1) if out else np.zeros(0, np.float32)

    return predict


def predict_proba(model: keras.Model, images: np.ndarray, batch_size: int = 64,
                  views: Sequence[tuple[float, float]] = ((1.0, 1.0),)) -> np.ndarray:
    """Pneumonia probabilities, shape (N,), for uint8 images (N, S, S, 1), averaged over `views`."""
    return compile_forward(model, batch_size, views)(images)
