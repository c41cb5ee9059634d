"""The fit loop: one network trained the way a run trains it, and several trained and averaged."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np

from cxr_model.callbacks import BestSnapshots, TimeBudget, averaged_weights_callbacks, training_callbacks
from cxr_model.config import TrainConfig
from cxr_model.model import ConvNetConfig, build_convnet, mean_ensemble
from cxr_model.pipelines import recipe_datasets


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
