"""The convnet: plain Keras code that takes ordinary arguments (the hypermodel only samples them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
from keras import layers


@dataclass(frozen=True)
class ConvNetConfig:
    image_size: int = 128  # input side in pixels; input is (B, S, S, 1) grayscale, 0..255
    blocks: int = 4  # conv blocks after the stem; each halves the resolution
    filters: int = 32  # filters of the first block, doubled per block (capped at max_filters)
    max_filters: int = 256
    convs_per_block: int = 1  # 3x3 conv + BN + ReLU repeats inside a block
    stem_stride: int = 2  # 2 halves the resolution up front: ~4x fewer FLOPs per image
    dropout: float = 0.3  # after global average pooling
    dense_units: int = 64  # 0 = no hidden dense layer
    learning_rate: float = 1e-3
    label_smoothing: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@keras.saving.register_keras_serializable(package="cxr_model")
class PerImageStandardization(layers.Layer):
    """Zero mean, unit variance per image: removes exposure and contrast differences between scanners."""

    def call(self, x):
        mean = keras.ops.mean(x, axis=(1, 2, 3), keepdims=True)
        var = keras.ops.var(x, axis=(1, 2, 3), keepdims=True)
        return (x - mean) / keras.ops.sqrt(var + 1e-6)


def _conv_bn_relu(x, filters: int, strides: int = 1, name: str = ""):
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    # momentum 0.9 (Keras: 0.99): moving statistics settle within ~50 steps, so the validation score of a
    # 2-epoch search trial measures the weights, not half-initialised batch-norm statistics.
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def build_convnet(cfg: ConvNetConfig) -> keras.Model:
    """Compiled binary classifier; preprocessing (standardization) lives inside the model."""
    inputs = keras.Input((cfg.image_size, cfg.image_size, 1), name="image")  # (B, S, S, 1) 0..255
    x = PerImageStandardization(name="standardize")(inputs)
    x = _conv_bn_relu(x, max(cfg.filters // 2, 8), strides=cfg.stem_stride, name="stem")  # (B, S/2, S/2, F/2)
    for b in range(cfg.blocks):
        width = min(cfg.filters * 2**b, cfg.max_filters)
        for c in range(cfg.convs_per_block):
            x = _conv_bn_relu(x, width, name=f"block{b + 1}_{c + 1}")
        if x.shape[1] >= 2:  # small inputs run out of resolution before they run out of blocks
            x = layers.MaxPooling2D(name=f"block{b + 1}_pool")(x)  # halves H and W
    x = layers.GlobalAveragePooling2D(name="gap")(x)  # (B, C)
    x = layers.Dropout(cfg.dropout, name="dropout")(x)
    if cfg.dense_units:
        x = layers.Dense(cfg.dense_units, activation="relu", name="dense")(x)
        x = layers.Dropout(cfg.dropout / 2, name="dense_dropout")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="pneumonia")(x)  # (B, 1) probability
    model = keras.Model(inputs, outputs, name="cxr_convnet")
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=[
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.AUC(name="auc"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
        ],
    )
    return model


def build_augmentation(
    rotation: float, zoom: float, translation: float, contrast: float, brightness: float, seed: int
) -> keras.Sequential:
    """Random* layers mapped over the training tf.data pipeline only; never part of the saved model."""
    return keras.Sequential(
        [
            layers.RandomRotation(rotation, fill_mode="constant", seed=seed),
            layers.RandomZoom(zoom, fill_mode="constant", seed=seed + 1),
            layers.RandomTranslation(translation, translation, fill_mode="constant", seed=seed + 2),
            layers.RandomContrast(contrast, value_range=(0, 255), seed=seed + 3),
            layers.RandomBrightness(brightness, value_range=(0, 255), seed=seed + 4),
        ],
        name="augmentation",
    )


def count_flops(cfg: ConvNetConfig) -> int:
    """Forward multiply-adds x2 of the conv and dense layers for one image (training step ~3x this)."""
    side, channels, flops = cfg.image_size, 1, 0
    stem = max(cfg.filters // 2, 8)
    side = -(-side // cfg.stem_stride)
    flops += 2 * side * side * 9 * channels * stem
    channels = stem
    for b in range(cfg.blocks):
        width = min(cfg.filters * 2**b, cfg.max_filters)
        for _ in range(cfg.convs_per_block):
            flops += 2 * side * side * 9 * channels * width
            channels = width
        side = side // 2 if side >= 2 else side
    if cfg.dense_units:
        flops += 2 * channels * cfg.dense_units + 2 * cfg.dense_units
    else:
        flops += 2 * channels
    return flops
