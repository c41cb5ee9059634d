"""The reference notebook's model, rebuilt faithfully so speed ratios mean something.

150x150 grayscale; five conv blocks of 32-64-64-128-256 filters (3x3, same padding, ReLU, batch norm,
max-pool; dropout 0.1/0.2/0.2 after blocks 2/4/5); flatten; dense 128 + dropout 0.2; sigmoid; RMSprop;
batch 32; 12 epochs; augmentation rotation 30 degrees, zoom 0.2, shifts 0.1.
"""

from __future__ import annotations

import keras
from keras import layers

IMAGE_SIZE = 150
EPOCHS = 12
BATCH_SIZE = 32


def build_reference() -> keras.Model:
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1))
    x = layers.Rescaling(1.0 / 255)(inputs)
    for filters, dropout in ((32, 0.0), (64, 0.1), (64, 0.0), (128, 0.2), (256, 0.2)):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        if dropout:
            x = layers.Dropout(dropout)(x)
        x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D(2, strides=2, padding="same")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.2)(x)
    outputs = layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(inputs, outputs, name="reference")
    model.compile(optimizer=keras.optimizers.RMSprop(), loss="binary_crossentropy",
                  metrics=["accuracy", keras.metrics.AUC(name="auc")])
    return model


def reference_augmentation(seed: int = 0) -> keras.Sequential:
    """ImageDataGenerator(rotation_range=30, zoom_range=0.2, width/height_shift_range=0.1) as Random* layers."""
    return keras.Sequential([
        layers.RandomRotation(30 / 360, fill_mode="nearest", seed=seed),
        layers.RandomZoom(0.2, fill_mode="nearest", seed=seed + 1),
        layers.RandomTranslation(0.1, 0.1, fill_mode="nearest", seed=seed + 2),
    ])


def reference_flops() -> int:
    """Forward FLOPs of one 150x150 image (conv and dense multiply-adds x2)."""
    side, channels, flops = IMAGE_SIZE, 1, 0
    for filters in (32, 64, 64, 128, 256):
        flops += 2 * side * side * 9 * channels * filters
        channels, side = filters, -(-side // 2)
    return flops + 2 * side * side * channels * 128 + 2 * 128
