"""Training augmentation (one fused op per batch) and the fixed warps of test-time views."""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf


def affine_transforms(angle, sx, sy, dx, dy, cx, cy):
    """(B, 8) rows for ImageProjectiveTransformV3: rotate by `angle`, scale by (sx, sy), shift by (dx, dy).

    The op maps each output pixel p to the input pixel it samples, here centre + R(angle) diag(1/sx, 1/sy)
    (p - centre) - shift: the content moves by (dx, dy) input pixels, then turns about the centre and is
    stretched along the image axes by sx and sy (> 1 magnifies).
    """
    a0, a1 = tf.cos(angle) / sx, -tf.sin(angle) / sy
    b0, b1 = tf.sin(angle) / sx, tf.cos(angle) / sy
    a2, b2 = cx - a0 * cx - a1 * cy - dx, cy - b0 * cx - b1 * cy - dy
    zeros = tf.zeros_like(a0)
    return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def warp_view(images, scale: float, ratio: float):
    """float (B, S, S, C) magnified by `scale` and stretched to width:height `ratio` about the centre.

    A test-time view: the same warp as training augmentation's, at a fixed setting, black outside the image.
    """
    if scale == 1.0 and ratio == 1.0:
        return images
    n, h, w = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    cx, cy = (tf.cast(w, tf.float32) - 1) / 2, (tf.cast(h, tf.float32) - 1) / 2
    stretch = ratio**0.5
    rows = affine_transforms(*(tf.fill([n], float(v)) for v in (0.0, scale * stretch, scale / stretch, 0.0, 0.0)),
                             cx, cy)
    return tf.raw_ops.ImageProjectiveTransformV3(images=images, transforms=rows, output_shape=tf.stack([h, w]),
                                                 fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")


class Augmentation:
    """Training augmentation as one fused op per batch: a random affine warp, then random intensity.

    Rotation, zoom, aspect ratio and translation are composed into one projective transform per image, so a
    batch is resampled once (Keras' RandomRotation, RandomZoom and RandomTranslation resample it three times,
    which on two cores was the difference between the input pipeline keeping up and not). The aspect ratio
    scales width and height apart, as Keras' ImageDataGenerator zoom does: scans of every shape were squashed
    to a square, so a chest's width-to-height ratio tells of the scanner and the crop, not of the lungs.
    Band erasing then blanks a random band at the top and another at the bottom of each image (each up to
    `erase` of the side, drawn apart), where the neck and shoulders and the upper abdomen sit: what a film
    shows above and below the lungs differs with the collimation, not with the lungs.
    A random loss of resolution follows: each image is blended, by its own random weight, with a copy of the
    batch down-sampled to a random fraction of the side and up-sampled back, as a scan from a detector or an
    export of lower resolution looks after the resize to our input size. Intensity changes are a random gamma
    (a nonlinear change of the exposure curve, which per-image standardization inside the model does not undo),
    contrast, brightness and Gaussian sensor noise. Runs in the tf.data pipeline on train batches only; never
    part of the saved model. Call as `aug(images, training=True)` on float (B, S, S, C) in 0..255.

    It shares two cores with training, so its cost is kept low (`benchmarks/speed.py`'s input-pipeline ratio): the
    gamma curve is computed as exp(g log x), which is the same number as `tf.pow` at a fifth of its cost, contrast and
    brightness are one multiply-add, and the sensor noise is drawn from a bank of `NOISE_FIELDS` standard-normal
    fields made once per image size (each image takes a random field, the batch a random circular shift of them,
    and each image its own sd), where drawing a fresh normal per pixel cost as much as the warp.
    """

    NOISE_FIELDS = 64

    def __init__(self, rotation: float, zoom: float, translation: float, contrast: float, brightness: float,
                 gamma: float = 0.0, noise: float = 0.0, aspect: float = 0.0, resolution: float = 0.0,
                 erase: float = 0.0, seed: int = 0):
        self.rotation, self.zoom, self.translation = rotation, zoom, translation  # turn fraction, scale, side fraction
        self.aspect = aspect  # log-range of width:height, e.g. 0.2 ~ ratios 0.82..1.22
        self.contrast, self.brightness, self.gamma = contrast, brightness, gamma  # gamma: log-range, e.g. 0.3
        self.resolution = resolution  # largest loss of resolution: 0.5 = down to half the side, and back
        self.noise = noise  # largest sd of additive Gaussian sensor noise, as a fraction of 255
        self.erase = erase  # largest band blanked at the top and at the bottom, as a fraction of the side
        self.seed = seed
        self._noise_banks: dict[tuple[int, int, int], np.ndarray] = {}

    def _noise_bank(self, shape: tuple[int, int, int]) -> np.ndarray:
        """(NOISE_FIELDS, H, W, C) standard-normal fields for images of `shape`, made once per shape and seed."""
        if shape not in self._noise_banks:
            rng = np.random.default_rng(self.seed * 7919 + 15)
            self._noise_banks[shape] = rng.standard_normal((self.NOISE_FIELDS, *shape), dtype=np.float32)
        return self._noise_banks[shape]

    def _noise(self, x, n):
        """Unit-sd Gaussian noise shaped like the batch `x`: bank fields, shifted, or fresh draws if sizes vary."""
        if None in x.shape[1:]:
            return tf.random.normal(tf.shape(x), seed=self.seed * 7919 + 9)
        salt = self.seed * 7919 + 16
        fields = tf.gather(self._noise_bank(tuple(x.shape[1:])),
                           tf.random.uniform((n,), 0, self.NOISE_FIELDS, tf.int32, seed=salt))
        shift = [tf.random.uniform((), 0, x.shape[axis], tf.int32, seed=salt + axis) for axis in (1, 2)]
        return tf.roll(fields, shift=shift, axis=[1, 2])

    def _uniform(self, n, limit: float, salt: int):
        return tf.random.uniform((n,), -limit, limit, seed=self.seed * 7919 + salt)

    def __call__(self, images, training: bool = True):
        if not training:
            return images
        x = tf.convert_to_tensor(images, tf.float32)
        n, h, w = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
        cx, cy = (tf.cast(w, tf.float32) - 1) / 2, (tf.cast(h, tf.float32) - 1) / 2
        angle = self._uniform(n, 2 * math.pi * self.rotation, 1)
        scale = 1 + self._uniform(n, self.zoom, 2)  # > 1 magnifies
        stretch = tf.exp(self._uniform(n, self.aspect / 2, 10))  # width:height = stretch**2
        sx, sy = scale * stretch, scale / stretch
        dx = self._uniform(n, self.translation, 3) * tf.cast(w, tf.float32)
        dy = self._uniform(n, self.translation, 4) * tf.cast(h, tf.float32)
        transforms = affine_transforms(angle, sx, sy, dx, dy, cx, cy)
        x = tf.raw_ops.ImageProjectiveTransformV3(
            images=x, transforms=transforms, output_shape=tf.stack([h, w]), fill_value=0.0,
            interpolation="BILINEAR", fill_mode="CONSTANT",
        )
        per_image = (n, 1, 1, 1)
        if self.erase:
            # rows [0, top) and [bottom, h) become 0, the warp's fill: (n, h, 1, 1) mask, one top and bottom each
            side = tf.cast(h, tf.float32)
            top = tf.random.uniform((n, 1), 0, self.erase, seed=self.seed * 7919 + 13) * side
            bottom = side - tf.random.uniform((n, 1), 0, self.erase, seed=self.seed * 7919 + 14) * side
            rows = tf.cast(tf.range(h), tf.float32)[tf.newaxis, :] + 0.5  # pixel centres
            keep = tf.cast((rows >= top) & (rows < bottom), tf.float32)
            x = x * tf.reshape(keep, (n, h, 1, 1))
        if self.resolution:
            # one down-sampled size per batch (resize takes one size), one blend weight per image
            keep = 1 - tf.random.uniform((), 0, self.resolution, seed=self.seed * 7919 + 11)
            small = tf.maximum(tf.cast(tf.round(tf.cast(tf.stack([h, w]), tf.float32) * keep), tf.int32), 1)
            low = tf.image.resize(tf.image.resize(x, small, antialias=True), tf.stack([h, w]), method="bilinear")
            mix = tf.reshape(tf.random.uniform((n,), 0, 1, seed=self.seed * 7919 + 12), per_image)
            x = x + mix * (low - x)
        if self.gamma:  # 255 (x / 255) ** gamma; black (log 0 = -inf) stays 0
            gamma = tf.reshape(tf.exp(self._uniform(n, self.gamma, 5)), per_image)
            x = 255.0 * tf.exp(gamma * tf.math.log(tf.clip_by_value(x / 255.0, 0.0, 1.0)))
        if self.contrast or self.brightness:  # (x - mean) * factor + mean + brightness, as one multiply-add
            factor = tf.reshape(1 + self._uniform(n, self.contrast, 6), per_image)
            offset = tf.reshape(self._uniform(n, self.brightness, 7), per_image) * 255.0
            if self.contrast:
                offset += (1 - factor) * tf.reduce_mean(x, axis=(1, 2, 3), keepdims=True)
            x = x * factor + offset
        if self.noise:
            sd = tf.reshape(tf.abs(self._uniform(n, self.noise, 8)), per_image) * 255.0
            x = x + sd * self._noise(x, n)
        return tf.clip_by_value(x, 0.0, 255.0)


build_augmentation = Augmentation  # the training augmentation of one run; its ranges are AUGMENTATION_FIELDS
