"""tf.data pipelines, callbacks and the fit loop, on decoded uint8 arrays."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from cxr_model.config import Schedule, TrainConfig
from cxr_model.data import class_weights
from cxr_model.model import ConvNetConfig, build_augmentation, build_convnet, mean_ensemble, warp_view


def configure_threads(intra_op: int | None, inter_op: int | None = None) -> None:
    """Fix TensorFlow's thread pools before the first op runs (no effect afterwards); None keeps TF's choice."""
    try:
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:  # TensorFlow already initialised: keep its pools
        pass


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


def fit_recipe(model: keras.Model, cfg: TrainConfig, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
               y_val: np.ndarray, callbacks: list | tuple = (), verbose: int = 0) -> keras.callbacks.History:
    """Train `model` the way a run does: augmentation, early stopping and LR decay on val AUC (class weights if set).

    With `cfg.train_minutes` a `TimeBudget` ends training before an epoch that would overrun it; the returned
    history's `stopped_by_budget` says whether it did. Its `snapshots` is a `BestSnapshots` holding the weights
    of the `cfg.snapshots` best epochs by validation AUC (`model` itself ends on the best one).
    """
    train, val = recipe_datasets(cfg, x_train, y_train, x_val, y_val)
    budget = [TimeBudget(cfg.train_minutes * 60)] if cfg.train_minutes else []
    snapshots = BestSnapshots(cfg.snapshots)
    averaged = averaged_weights_callbacks(getattr(model.optimizer, "use_ema", False))
    schedule = training_callbacks(cfg.patience, cfg.schedule, cfg.epochs)
    history = model.fit(train, validation_data=val, epochs=cfg.epochs, verbose=verbose,
                        callbacks=[*averaged, *schedule, *budget, snapshots, *callbacks])
    history.stopped_by_budget = bool(budget and budget[0].stopped_early)
    history.snapshots = snapshots
    return history


@dataclass
class FittedNetworks:
    """What `fit_networks` trained: every kept set of weights with the architecture it belongs to."""

    configs: list[ConvNetConfig] = field(default_factory=list)  # one per kept set of weights
    weights: list[list] = field(default_factory=list)
    histories: list[keras.callbacks.History] = field(default_factory=list)  # one per network, in training order

    @property
    def epochs(self) -> list[int]:
        """Epochs each network trained."""
        return [len(h.history["loss"]) for h in self.histories]

    @property
    def stopped_by_budget(self) -> bool:
        return any(h.stopped_by_budget for h in self.histories)

    def model(self) -> keras.Model:
        """The run's model: the mean of every kept set's predictions (`mean_ensemble`)."""
        return mean_ensemble(self.configs, self.weights)


def fit_networks(networks: Sequence[ConvNetConfig], cfg: TrainConfig, x_train: np.ndarray, y_train: np.ndarray,
                 x_val: np.ndarray, y_val: np.ndarray,
                 callbacks: Callable[[int], Sequence[keras.callbacks.Callback]] = lambda n: (),
                 verbose: int = 0) -> FittedNetworks:
    """Train each of `networks` with `fit_recipe`, network n = 1, 2, ... from seed `cfg.seed + n - 1`.

    The seed fixes the network's initialisation, shuffling and augmentation; each network gets an equal share of
    `cfg.train_minutes` and keeps its `cfg.snapshots` best epochs by validation AUC (the weights training ended
    on when no epoch had a finite AUC, e.g. a validation split of one class). `callbacks(n)` gives network n's
    extra callbacks. The flow and the benchmarks train members through this one function, so a recipe probe
    trains what a run would.
    """
    if not networks:
        raise ValueError("fit_networks needs at least one network")
    budget = cfg.train_minutes / len(networks) if cfg.train_minutes else None
    fitted = FittedNetworks()
    for n, net in enumerate(networks, start=1):
        member_cfg = cfg.model_copy(update=dict(seed=cfg.seed + n - 1, train_minutes=budget))
        keras.utils.set_random_seed(member_cfg.seed)
        model = build_convnet(net)
        history = fit_recipe(model, member_cfg, x_train, y_train, x_val, y_val, callbacks=callbacks(n),
                             verbose=verbose)
        kept = history.snapshots.weights or [model.get_weights()]
        fitted.weights += kept
        fitted.configs += [net] * len(kept)
        fitted.histories.append(history)
    return fitted


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
