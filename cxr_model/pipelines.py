"""tf.data pipelines on decoded uint8 arrays: batching, augmentation, balanced sampling, mixup, class weights."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from cxr_model.augmentation import build_augmentation
from cxr_model.config import TrainConfig
from cxr_model.data import class_weights


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    augmentation: keras.Model | None = None,
    shuffle: bool = False,
    seed: int = 0,
    balanced: bool = False,
    mixup: float = 0.0,
    class_weight: dict[int, float] | None = None,
) -> tf.data.Dataset:
    """Batches of (float32 (B, S, S, 1) in 0..255, float32 (B,) labels); augmentation on train only.

    With `class_weight` ({label: weight}, as Keras' `fit` takes it) or `mixup`, batches are (images, labels,
    sample weights): each image weighs its class's weight (1 without `class_weight`). The weights travel with the
    images, so do not also pass `class_weight` to `fit`.

    `mixup` > 0 blends each (augmented) image with another of its batch, image, label and weight alike, by a
    weight drawn from Beta(mixup, mixup) (Zhang et al., ICLR 2018). (An approximation: for a pair of different
    classes this is not the class-weighted loss of the soft target; the best prediction is then simply the
    blended label.) Training metrics read soft labels as PNEUMONIA or as wrong; validation, which decides
    everything, is not mixed.

    `balanced` draws each image's class with equal odds, `len(images)` images an epoch, each class reshuffled every
    epoch; it implies `shuffle`. The rarer class's images recur within an epoch (each time augmented anew), and
    the commoner class's are not all drawn in one (with 26% NORMAL: each NORMAL ~1.9 times, two thirds of the
    PNEUMONIA images, other ones each epoch).
    """
    if balanced:
        ds = _balanced(images, labels.astype("float32"), seed)
    else:
        ds = tf.data.Dataset.from_tensor_slices((images, labels.astype("float32")))
    if shuffle and not balanced:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    if augmentation is not None:
        ds = ds.map(lambda x, y: (augmentation(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    if class_weight is not None or mixup:
        table = tf.constant([(class_weight or {}).get(c, 1.0) for c in (0, 1)], tf.float32)
        ds = ds.map(lambda x, y: (x, y, tf.gather(table, tf.cast(y, tf.int32))), num_parallel_calls=tf.data.AUTOTUNE)
    if mixup:
        ds = ds.map(_mixup(mixup, seed), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _mixup(alpha: float, seed: int) -> Callable:
    """(x, y, w) batch -> the same blended with a shuffled copy of itself by weights ~ Beta(alpha, alpha)."""

    def blend(x, y, w):
        n = tf.shape(x)[0]
        a = tf.random.gamma((n,), alpha, seed=seed * 7919 + 21)
        b = tf.random.gamma((n,), alpha, seed=seed * 7919 + 22)
        lam = a / tf.maximum(a + b, 1e-12)  # Beta(alpha, alpha)
        other = tf.random.shuffle(tf.range(n), seed=seed * 7919 + 23)
        x = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * tf.gather(x, other)
        return x, lam * y + (1 - lam) * tf.gather(y, other), lam * w + (1 - lam) * tf.gather(w, other)

    return blend


def _balanced(images: np.ndarray, labels: np.ndarray, seed: int) -> tf.data.Dataset:
    """(image, label) pairs, each class drawn with equal odds, len(images) of them per pass."""
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"balanced sampling needs both classes in the training split, got only {classes.tolist()}")
    per_class = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        ds = tf.data.Dataset.from_tensor_slices((images[idx], labels[idx]))
        per_class.append(ds.shuffle(len(idx), seed=seed, reshuffle_each_iteration=True).repeat())
    mixed = tf.data.Dataset.sample_from_datasets(per_class, seed=seed, rerandomize_each_iteration=True)
    return mixed.take(len(images))


def loss_class_weights(cfg: TrainConfig, labels: np.ndarray) -> dict[int, float] | None:
    """{label: weight} of a run: against the imbalance, unless balanced sampling already evens it out."""
    return class_weights(labels) if cfg.class_weights and not cfg.balanced_sampling else None


def recipe_datasets(cfg: TrainConfig, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                    y_val: np.ndarray) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """(train, validation) pipelines of a run: train shuffled and augmented (if enabled), validation as is.

    The run's class weights (`loss_class_weights`) ride in the train batches as sample weights: nothing passes
    `class_weight` to `fit`.
    """
    augment = build_augmentation(**cfg.augmentation_params()) if cfg.augment else None
    train = make_dataset(x_train, y_train, cfg.batch_size, augment, shuffle=True, seed=cfg.seed,
                         balanced=cfg.balanced_sampling, mixup=cfg.mixup,
                         class_weight=loss_class_weights(cfg, y_train))
    return train, make_dataset(x_val, y_val, cfg.batch_size)
