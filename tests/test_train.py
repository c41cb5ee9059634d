"""Training loop pieces: the time budget, the best-epoch snapshots and their ensemble, the flatten head."""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest

from cxr_model.callbacks import BestSnapshots, CosineEpochs, TimeBudget, training_callbacks
from cxr_model.config import load_config
from cxr_model.fitting import fit_networks, fit_recipe
from cxr_model.inference import compile_forward
from cxr_model.model import ConvNetConfig, build_convnet, count_flops, ensemble_members, mean_ensemble
from cxr_model.pipelines import loss_class_weights, make_dataset, recipe_datasets


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
    ahead = TimeBudget(45.0, clock=lambda: next(ticks))
    assert _fit_with(ahead, epochs=6) == 2  # 40 s spent is within 45, but the next epoch's 10 would not be

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


def test_best_snapshots_keeps_the_k_best_epochs() -> None:
    model = build_convnet(ConvNetConfig(image_size=32, blocks=2, filters=8, dense_units=0))
    keep = BestSnapshots(2)
    keep.set_model(model)
    keep.on_train_begin()
    for epoch, auc in enumerate([0.90, 0.97, float("nan"), 0.95, 0.93]):
        model.get_layer("pneumonia").bias.assign([float(epoch)])  # tags the weights with their epoch
        keep.on_epoch_end(epoch, {"val_auc": auc})
    assert keep.epochs == [2, 4]  # 1-based, best first; the NaN epoch is never kept
    bias = [w[-1][0] for w in keep.weights]  # the output layer's bias is the last weight
    assert bias == [1.0, 3.0]
    with pytest.raises(ValueError, match="at least one"):
        BestSnapshots(0)


def test_mean_ensemble_averages_its_members(tmp_path) -> None:
    cfg = ConvNetConfig(image_size=32, blocks=2, filters=8, dense_units=0)
    first, second = build_convnet(cfg), build_convnet(cfg)
    second.get_layer("pneumonia").bias.assign([2.0])  # a different model, not a copy
    x, _ = _tiny_data(6)
    p1, p2 = (m.predict(x.astype("float32"), verbose=0)[:, 0] for m in (first, second))
    assert not np.allclose(p1, p2)

    ensemble = mean_ensemble(cfg, [first.get_weights(), second.get_weights()])
    assert [m.name for m in ensemble_members(ensemble)] == ["member1", "member2"]
    np.testing.assert_allclose(compile_forward(ensemble)(x), (p1 + p2) / 2, rtol=1e-5, atol=1e-6)
    # what the flow saves and serving loads
    ensemble.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", compile=False)
    np.testing.assert_allclose(compile_forward(loaded)(x), (p1 + p2) / 2, rtol=1e-5, atol=1e-6)

    single = mean_ensemble(cfg, [second.get_weights()])  # one snapshot: the plain convnet
    assert single.name == "cxr_convnet" and ensemble_members(single) == [single]
    np.testing.assert_allclose(compile_forward(single)(x), p2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        mean_ensemble(cfg, [])


def test_mean_ensemble_of_different_networks(tmp_path) -> None:
    # what `--top-trials` saves: other search trials' architectures in one model
    deep = ConvNetConfig(image_size=32, blocks=3, filters=8, dense_units=0)
    wide = ConvNetConfig(image_size=32, blocks=2, filters=16, dense_units=16, dropout=0.2)
    first, second = build_convnet(deep), build_convnet(wide)
    x, _ = _tiny_data(6)
    p1, p2 = (m.predict(x.astype("float32"), verbose=0)[:, 0] for m in (first, second))

    ensemble = mean_ensemble([deep, wide], [first.get_weights(), second.get_weights()])
    assert [m.count_params() for m in ensemble_members(ensemble)] == [first.count_params(), second.count_params()]
    np.testing.assert_allclose(compile_forward(ensemble)(x), (p1 + p2) / 2, rtol=1e-5, atol=1e-6)
    ensemble.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", compile=False)
    np.testing.assert_allclose(compile_forward(loaded)(x), (p1 + p2) / 2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="2 architectures for 1 sets"):
        mean_ensemble([deep, wide], [first.get_weights()])
    with pytest.raises(ValueError, match="different input sizes"):
        mean_ensemble([deep, ConvNetConfig(image_size=64, blocks=2, filters=16, dense_units=16)],
                      [first.get_weights(), second.get_weights()])


def test_fit_recipe_returns_the_best_epochs() -> None:
    x, y = _tiny_data()
    cfg = load_config("smoke", image_size=32, epochs=3, patience=3, batch_size=8, snapshots=2, train_minutes=0)
    model = build_convnet(ConvNetConfig(image_size=32, blocks=2, filters=8, dense_units=0))
    history = fit_recipe(model, cfg, x, y, x[:8], y[:8])
    aucs = history.history["val_auc"]
    assert len(history.snapshots.epochs) == 2
    assert [aucs[e - 1] for e in history.snapshots.epochs] == sorted(aucs, reverse=True)[:2]


def test_cosine_schedule_anneals_the_rate_over_the_epochs() -> None:
    x, y = _tiny_data()
    cfg = load_config("smoke", image_size=32, epochs=4, patience=4, batch_size=8, train_minutes=0, augment=False,
                      schedule="cosine")
    model = build_convnet(ConvNetConfig(image_size=32, blocks=2, filters=8, dense_units=0, learning_rate=0.01))
    rates = []

    class Rate(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))

    fit_recipe(model, cfg, x, y, x[:8], y[:8], callbacks=[Rate()])
    # epoch e of 4 at 0.01 (1 + cos(pi e / 4)) / 2, whatever validation AUC did
    np.testing.assert_allclose(rates, [0.01, 0.0085355, 0.005, 0.0014645], rtol=1e-4)
    kinds = [type(c) for c in training_callbacks(4)]
    assert keras.callbacks.ReduceLROnPlateau in kinds and CosineEpochs not in kinds  # the default: plateau
    kinds = [type(c) for c in training_callbacks(4, "cosine", 12)]
    assert CosineEpochs in kinds and keras.callbacks.ReduceLROnPlateau not in kinds
    with pytest.raises(ValueError, match="number of epochs"):
        training_callbacks(4, "cosine")
    with pytest.raises(ValueError, match="plateau or cosine"):
        training_callbacks(4, "step")
    with pytest.raises(ValueError, match="at least one epoch"):
        CosineEpochs(0)


def test_fit_recipe_judges_and_keeps_the_averaged_weights() -> None:
    """With `ema`, each epoch is scored, snapshotted and kept by the moving average of the steps' weights, and the
    steps themselves go on from the raw weights (the average is swapped in at each epoch's end, out at its start)."""
    x, y = _tiny_data()
    momentum = 0.8
    cfg = load_config("smoke", image_size=32, epochs=3, patience=3, batch_size=8, snapshots=3, train_minutes=0,
                      augment=False)
    keras.utils.set_random_seed(0)
    model = build_convnet(ConvNetConfig(image_size=32, blocks=2, filters=8, dense_units=0, learning_rate=0.01,
                                        ema=momentum))
    raw, ends = [], []  # the raw trainable weights after every step; the steps done at each epoch's end

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raw.append([v.numpy().copy() for v in self.model.trainable_variables])

        def on_epoch_end(self, epoch, logs=None):
            ends.append(len(raw))

    history = fit_recipe(model, cfg, x, y, x[:8], y[:8], callbacks=[Record()])
    average, averages = raw[0], {1: raw[0]}  # Keras's rule: the first step copies, then m * average + (1 - m) * weights
    for step, weights in enumerate(raw[1:], start=2):
        average = [momentum * a + (1 - momentum) * w for a, w in zip(average, weights, strict=True)]
        averages[step] = average
    trainable = [v.trainable for v in model.weights]
    for epoch, kept in zip(history.snapshots.epochs, history.snapshots.weights, strict=True):
        kept = [w for w, t in zip(kept, trainable, strict=True) if t]
        for got, want in zip(kept, averages[ends[epoch - 1]], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert any(not np.allclose(g, r, atol=1e-5) for g, r in zip(kept, raw[ends[epoch - 1] - 1], strict=True))
    best = history.snapshots.epochs[0]
    # the model ends on the best epoch's average
    for got, want in zip(model.trainable_variables, averages[ends[best - 1]], strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)


def test_fit_networks_trains_each_network_from_its_own_seed() -> None:
    x, y = _tiny_data()
    cfg = load_config("smoke", image_size=32, epochs=2, patience=2, batch_size=8, snapshots=2, train_minutes=0,
                      seed=5)
    small = ConvNetConfig(image_size=32, blocks=2, filters=8, dense_units=0)
    deeper = ConvNetConfig(image_size=32, blocks=3, filters=8, dense_units=0)
    starts = {}

    class Start(keras.callbacks.Callback):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.n = n

        def on_train_begin(self, logs=None) -> None:
            starts[self.n] = self.model.get_weights()[0]

    fitted = fit_networks([small, small, deeper], cfg, x, y, x[:8], y[:8], callbacks=lambda n: [Start(n)])
    assert list(starts) == [1, 2, 3]  # each network's own callbacks, in training order
    assert fitted.epochs == [2, 2, 2] and not fitted.stopped_by_budget
    assert fitted.configs == [small] * 4 + [deeper] * 2  # two kept epochs per network
    # network n starts from seed cfg.seed + n - 1 (training itself is not bit-reproducible on CPU threads)
    for n in (1, 2):
        keras.utils.set_random_seed(5 + n - 1)
        np.testing.assert_array_equal(starts[n], build_convnet(small).get_weights()[0])
    assert not np.array_equal(starts[1], starts[2])
    model = fitted.model()
    assert len(ensemble_members(model)) == 6
    with pytest.raises(ValueError, match="at least one network"):
        fit_networks([], cfg, x, y, x[:8], y[:8])


def test_fit_networks_shares_the_time_budget() -> None:
    x, y = _tiny_data()
    cfg = load_config("smoke", image_size=32, epochs=3, patience=3, batch_size=8, train_minutes=1e-6)
    net = ConvNetConfig(image_size=32, blocks=2, filters=8, dense_units=0)
    fitted = fit_networks([net, net], cfg, x, y, x[:8], y[:8])
    assert fitted.epochs == [1, 1] and fitted.stopped_by_budget
    assert all(h.stopped_by_budget for h in fitted.histories)


def test_balanced_sampling_draws_both_classes_alike() -> None:
    x = np.arange(200, dtype="uint8").reshape(200, 1, 1, 1).repeat(4, axis=1).repeat(4, axis=2)  # image i is all i
    y = (np.arange(200) >= 50).astype(int)  # 50 NORMAL (0..49), 150 PNEUMONIA
    ds = make_dataset(x, y, 20, balanced=True, seed=1)
    firsts = []
    for _ in range(3):  # three epochs
        batches = list(ds)
        images = np.concatenate([b[0].numpy()[:, 0, 0, 0] for b in batches])
        labels = np.concatenate([b[1].numpy() for b in batches])
        assert len(labels) == 200  # an epoch is as long as the split
        np.testing.assert_array_equal(images < 50, labels == 0)  # each image keeps its label
        assert 0.38 < labels.mean() < 0.62  # ~half PNEUMONIA, where the split has 75%
        firsts.append(images[:20].tolist())
    assert len({tuple(f) for f in firsts}) == 3  # every epoch draws anew
    plain = np.concatenate([b[1].numpy() for b in make_dataset(x, y, 20, shuffle=True, seed=1)])
    assert plain.mean() == 0.75
    with pytest.raises(ValueError, match="both classes"):
        make_dataset(x[:50], y[:50], 20, balanced=True)


def test_balanced_sampling_replaces_class_weights() -> None:
    y = np.array([0, 1, 1, 1])
    weighted = loss_class_weights(load_config("smoke", class_weights=True), y)
    assert weighted[0] > weighted[1]
    assert loss_class_weights(load_config("smoke", class_weights=True, balanced_sampling=True), y) is None
    assert loss_class_weights(load_config("smoke"), y) is None  # off by default
    x, labels = _tiny_data(n=60)
    labels = (np.arange(60) >= 15).astype(int)  # 25% NORMAL
    cfg = load_config("smoke", image_size=32, epochs=1, batch_size=10, train_minutes=0, balanced_sampling=True,
                      augment=False)
    train, _ = recipe_datasets(cfg, x, labels, x[:8], labels[:8])
    drawn = np.concatenate([b[1].numpy() for epoch in range(4) for b in train])  # four epochs
    assert len(drawn) == 240 and 0.4 < drawn.mean() < 0.6  # the run's pipeline draws both classes alike
    history = fit_recipe(build_convnet(ConvNetConfig(image_size=32, blocks=2, filters=8, dense_units=0)), cfg, x,
                         labels, x[:8], labels[:8])
    assert len(history.history["loss"]) == 1


def test_mixup_blends_images_labels_and_class_weights_alike() -> None:
    import tensorflow as tf

    tf.random.set_seed(0)  # with the op seeds, the same draws whatever ran before
    x = np.zeros((64, 4, 4, 1), np.uint8)
    x[32:] = 200  # NORMAL images are black, PNEUMONIA ones 200
    y = (np.arange(64) >= 32).astype(int)
    ds = make_dataset(x, y, 16, shuffle=True, seed=3, mixup=0.4, class_weight={0: 3.0, 1: 1.0})
    batches = list(ds)  # one pass: each pass draws anew
    images, labels, weights = (np.concatenate([b[i].numpy() for b in batches]) for i in range(3))
    share = images[:, 0, 0, 0] / 200  # how much of a PNEUMONIA image each blend holds
    np.testing.assert_allclose(labels, share, atol=1e-5)  # the label follows the image
    np.testing.assert_allclose(weights, 3.0 - 2.0 * share, atol=1e-5)  # and so does the class weight
    assert ((share > 0.05) & (share < 0.95)).mean() > 0.1  # blends for real, not just copies (~0.35 expected)
    assert abs(labels.mean() - 0.5) < 0.2  # on average the split's own mix


def test_run_pipeline_carries_the_class_weights_with_and_without_mixup() -> None:
    import tensorflow as tf

    tf.random.set_seed(0)
    x, _ = _tiny_data(n=40)
    labels = (np.arange(40) >= 10).astype(int)
    cfg = load_config("smoke", image_size=32, epochs=1, batch_size=10, train_minutes=0, mixup=0.2, augment=False,
                      class_weights=True)
    train, _ = recipe_datasets(cfg, x, labels, x[:8], labels[:8])
    batches = list(train)
    assert all(len(b) == 3 for b in batches)  # (images, soft labels, blended class weights)
    cw = loss_class_weights(cfg, labels)
    soft, weights = (np.concatenate([b[i].numpy() for b in batches]) for i in (1, 2))
    np.testing.assert_allclose(weights, cw[0] + (cw[1] - cw[0]) * soft, rtol=1e-5)  # the run's class weights
    plain, _ = recipe_datasets(cfg.model_copy(update={"mixup": 0.0}), x, labels, x[:8], labels[:8])
    batches = list(plain)  # one pass: each pass reshuffles
    hard, weights = (np.concatenate([b[i].numpy() for b in batches]) for i in (1, 2))
    np.testing.assert_allclose(weights, np.where(hard == 0, cw[0], cw[1]), rtol=1e-6)  # Keras' class_weight, as is
    history = fit_recipe(build_convnet(ConvNetConfig(image_size=32, blocks=2, filters=8, dense_units=0)), cfg, x,
                         labels, x[:8], labels[:8])  # no class_weight passed to fit next to sample weights
    assert len(history.history["loss"]) == 1 and np.isfinite(history.history["loss"][0])
