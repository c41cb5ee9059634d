"""Training loop pieces: the time budget of the final training and the flatten head."""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest

from cxr_model.config import load_config
from cxr_model.model import ConvNetConfig, build_convnet, count_flops
from cxr_model.train import TimeBudget, fit_recipe


def _tiny_data(n: int = 24, side: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.uniform(0, 120, (n, side, side, 1)) + 100 * y[:, None, None, None]  # PNEUMONIA brighter
    return x.astype("uint8"), y


def _fit_with(callback: keras.callbacks.Callback, epochs: int) -> int:
    x, y = _tiny_data()
    model = build_convnet(ConvNetConfig(image_size=32, blocks=2, filters=8, dense_units=0))
    history = model.fit(x.astype("float32"), y.astype("float32"), epochs=epochs, batch_size=8, verbose=0,
                        callbacks=[callback])
    return len(history.history["loss"])


def test_time_budget_stops_before_an_epoch_that_would_not_fit() -> None:
    ticks = itertools.count(0.0, 10.0)  # every clock read is 10 s later: each epoch "takes" 10 s
    budget = TimeBudget(35.0, clock=lambda: next(ticks))
    # after epoch 1: 20 s spent + 10 s for the next fits in 35; after epoch 2: 40 + 10 does not
    assert _fit_with(budget, epochs=6) == 2
    assert budget.stopped_early

    ticks = itertools.count(0.0, 10.0)
    roomy = TimeBudget(1000.0, clock=lambda: next(ticks))
    assert _fit_with(roomy, epochs=3) == 3
    assert not roomy.stopped_early
    with pytest.raises(ValueError, match="positive"):
        TimeBudget(0)


def test_fit_recipe_honours_train_minutes() -> None:
    x, y = _tiny_data()
    cfg = load_config("smoke", image_size=32, epochs=4, patience=4, batch_size=8, train_minutes=1e-6)
    model = build_convnet(ConvNetConfig(image_size=32, blocks=2, filters=8, dense_units=0))
    history = fit_recipe(model, cfg, x, y, x[:8], y[:8])
    assert len(history.history["loss"]) == 1 and history.stopped_by_budget  # any real epoch overruns 60 us

    unlimited = fit_recipe(build_convnet(ConvNetConfig(image_size=32, blocks=2, filters=8, dense_units=0)),
                           load_config("smoke", image_size=32, epochs=2, batch_size=8, train_minutes=0), x, y, x[:8],
                           y[:8])
    assert len(unlimited.history["loss"]) == 2 and not unlimited.stopped_by_budget


def test_flatten_head_weighs_features_by_place() -> None:
    gap = ConvNetConfig(image_size=64, blocks=3, filters=8, dense_units=16)
    flat = ConvNetConfig(image_size=64, blocks=3, filters=8, dense_units=16, head="flatten")
    model = build_convnet(flat)
    assert "flatten" in [layer.name for layer in model.layers] and "gap" not in [layer.name for layer in model.layers]
    # 64 -> stride-2 stem 32 -> three pools 4: the dense layer has a weight per place and channel
    assert model.get_layer("dense").kernel.shape == (4 * 4 * 32, 16)
    assert count_flops(flat) - count_flops(gap) == 2 * (4 * 4 - 1) * 32 * 16
    # the head is part of the search space's fixed settings, so every trial and the final model share it
    cfg = load_config("smoke", head="flatten")
    assert cfg.search_space_params()["fixed"]["head"] == "flatten"
