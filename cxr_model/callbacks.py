"""Keras callbacks of a training run: the learning-rate schedules, early stopping, the time budget, snapshots."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import keras
import numpy as np

from cxr_model.config import Schedule


def averaged_weights_callbacks(averaged: bool) -> list[keras.callbacks.Callback]:
    """What makes a model whose optimizer keeps a moving average of its weights (`ConvNetConfig.ema`) be judged
    and kept by those averaged weights: they are swapped in for validation and at each epoch's end, before
    the callbacks after it in the list (early stopping, snapshots) read the score and the weights, and swapped
    out again for the next epoch's steps. Empty when not `averaged`. Goes first in `fit`'s callbacks.
    """
    return [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if averaged else []


class CosineEpochs(keras.callbacks.Callback):
    """Sets the learning rate of epoch e (0-based) of `epochs` to lr0 * (1 + cos(pi * e / epochs)) / 2.

    lr0 is the optimizer's learning rate when training begins: the first epoch runs at it and the last at
    lr0 * (1 + cos(pi * (epochs - 1) / epochs)) / 2, near 0 (SGDR's annealing, Loshchilov & Hutter 2017, without
    restarts). A run that stops early, or that a time budget ends, ends higher up the curve.
    """

    def __init__(self, epochs: int):
        super().__init__()
        if epochs < 1:
            raise ValueError(f"CosineEpochs needs at least one epoch, got {epochs}")
        self.epochs = epochs

    def rate(self, epoch: int) -> float:
        return self.initial * (1 + math.cos(math.pi * min(epoch, self.epochs) / self.epochs)) / 2

    def on_train_begin(self, logs=None):
        self.initial = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_epoch_begin(self, epoch, logs=None):
        self.model.optimizer.learning_rate = self.rate(epoch)


def training_callbacks(patience: int, schedule: Schedule = "plateau",
                       epochs: int | None = None) -> list[keras.callbacks.Callback]:
    """Early stopping on validation AUC, and the learning rate's `schedule`: cut by 0.3 when validation AUC
    stalls (plateau), or a cosine from the initial rate to 0 over `epochs` (cosine)."""
    stopping = keras.callbacks.EarlyStopping(
        monitor="val_auc", mode="max", patience=patience, restore_best_weights=True, verbose=0
    )
    if schedule == "cosine":
        if epochs is None:
            raise ValueError("the cosine schedule needs the number of epochs")
        return [stopping, CosineEpochs(epochs)]
    if schedule != "plateau":
        raise ValueError(f"Unknown learning-rate schedule {schedule!r}: plateau or cosine")
    return [stopping, keras.callbacks.ReduceLROnPlateau(
        monitor="val_auc", mode="max", factor=0.3, patience=max(1, patience // 2), min_lr=1e-5, verbose=0
    )]


class TimeBudget(keras.callbacks.Callback):
    """Stops training before an epoch that would not finish within `seconds` of the start of training.

    An epoch is assumed to take as long as the longest one so far. With EarlyStopping(restore_best_weights=True)
    the model still ends on its best epoch. `stopped_early` tells whether the budget, not the epoch count, ended
    training.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        if seconds <= 0:
            raise ValueError(f"TimeBudget needs a positive number of seconds, got {seconds}")
        self.seconds, self.clock = float(seconds), clock
        self.stopped_early = False

    def on_train_begin(self, logs=None):
        self.started = self.epoch_started = self.clock()
        self.longest, self.stopped_early = 0.0, False

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = self.clock()

    def on_epoch_end(self, epoch, logs=None):
        now = self.clock()
        self.longest = max(self.longest, now - self.epoch_started)
        if now - self.started + self.longest > self.seconds:
            self.stopped_early = True
            self.model.stop_training = True


class BestSnapshots(keras.callbacks.Callback):
    """Keeps the weights of the `k` epochs with the highest `monitor` (validation AUC), best first.

    Their predictions, averaged, are the run's model when `k` > 1 (`cxr_model.model.mean_ensemble`): epochs
    of one training run disagree on images far from the training data, and averaging them costs no training.
    """

    def __init__(self, k: int, monitor: str = "val_auc"):
        super().__init__()
        if k < 1:
            raise ValueError(f"BestSnapshots keeps at least one epoch, got k={k}")
        self.k, self.monitor = k, monitor
        self.kept: list[tuple[float, int, list[np.ndarray]]] = []  # (score, epoch, weights), best first

    def on_train_begin(self, logs=None):
        self.kept = []

    def on_epoch_end(self, epoch, logs=None):
        score = (logs or {}).get(self.monitor)
        if score is None or not np.isfinite(score):
            return
        self.kept.append((float(score), epoch, self.model.get_weights()))
        self.kept = sorted(self.kept, key=lambda row: -row[0])[: self.k]  # stable: the earlier epoch wins a tie

    @property
    def weights(self) -> list[list[np.ndarray]]:
        return [w for _, _, w in self.kept]

    @property
    def epochs(self) -> list[int]:
        """1-based epochs of the kept snapshots, best first."""
        return [e + 1 for _, e, _ in self.kept]
