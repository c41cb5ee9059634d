"""The model's own Keras layers: intensity normalisation and anti-aliased subsampling, saved with the model."""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import layers


@keras.saving.register_keras_serializable(package="cxr_model")
class PerImageStandardization(layers.Layer):
    """Zero mean, unit variance per image: removes exposure and contrast differences between scanners."""

    def call(self, x):
        mean = keras.ops.mean(x, axis=(1, 2, 3), keepdims=True)
        var = keras.ops.var(x, axis=(1, 2, 3), keepdims=True)
        return (x - mean) / keras.ops.sqrt(var + 1e-6)


@keras.saving.register_keras_serializable(package="cxr_model")
class HistogramEqualization(layers.Layer):
    """Each pixel becomes its mid-rank within its own image, centred and scaled to unit variance.

    A global histogram equalization: any monotone change of the exposure curve (gamma, brightness, contrast,
    window and level) leaves the output the same, which per-image standardization only achieves for linear
    changes. Ties (a black border, a burnt-out corner) share the middle of their ranks, so a constant region maps
    to one value. The output is uniform on about (-1.73, 1.73) for an image without ties: zero mean, unit variance.
    Not differentiable with respect to the input (ranks); nothing here needs that gradient.
    """

    def call(self, x):
        shape = tf.shape(x)
        flat = tf.reshape(x, (shape[0], -1))  # (B, N)
        ordered = tf.sort(flat, axis=1)
        below = tf.searchsorted(ordered, flat, side="left")  # pixels strictly darker
        not_above = tf.searchsorted(ordered, flat, side="right")  # pixels darker or as dark
        n = tf.cast(tf.shape(flat)[1], x.dtype)
        cdf = tf.cast(below + not_above, x.dtype) / (2.0 * n)  # mid-rank in (0, 1)
        return tf.reshape((cdf - 0.5) * math.sqrt(12.0), shape)  # uniform(0, 1) has variance 1/12

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="cxr_model")
class FixedRescaling(layers.Layer):
    """0..255 to -1..1, the same affine map for every image (the reference notebook divides by 255).

    Per-image standardization and equalization measure a pixel against the rest of its frame, so a wider field
    of view (more dark background) or a brighter abdomen changes how bright the lungs read; here a grey level
    reads the same whatever else the frame holds, and exposure differences are left to the augmentation.
    """

    def call(self, x):
        return x / 127.5 - 1.0


INTENSITY_LAYERS = {"standardize": PerImageStandardization, "equalize": HistogramEqualization,
                    "rescale": FixedRescaling}


@keras.saving.register_keras_serializable(package="cxr_model")
class BlurPool2D(layers.Layer):
    """Low-pass, then keep every second pixel: a fixed [1, 2, 1] x [1, 2, 1] / 16 filter per channel, stride 2.

    Plain stride-2 subsampling (a strided conv, the max-pool's stride) aliases: detail finer than the new grid
    folds into coarse patterns that move with a one-pixel shift and vanish when the scan is a little blurrier.
    Filtering first keeps only what the coarser grid can hold (Zhang, "Making Convolutional Networks
    Shift-Invariant Again", ICML 2019). Edges are reflected, so a border does not darken.
    """

    def build(self, input_shape):
        taps = tf.constant([1.0, 2.0, 1.0])
        kernel = tf.tensordot(taps, taps, axes=0) / 16.0  # (3, 3), sums to 1
        self.kernel = tf.tile(kernel[:, :, None, None], (1, 1, int(input_shape[-1]), 1))  # (3, 3, C, 1)

    def call(self, x):
        x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="REFLECT")
        return tf.nn.depthwise_conv2d(x, self.kernel, strides=[1, 2, 2, 1], padding="VALID")

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        return b, None if h is None else -(-h // 2), None if w is None else -(-w // 2), c
