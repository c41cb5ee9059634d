"""The convnet builder, the hypermodel and the tuner factory, on tiny inputs."""

from __future__ import annotations

from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np
import pytest
import tensorflow as tf

from cxr_model.augmentation import build_augmentation
from cxr_model.inference import predict_proba
from cxr_model.layers import BlurPool2D, FixedRescaling, HistogramEqualization, PerImageStandardization
from cxr_model.model import ConvNetConfig, build_convnet, count_flops
from cxr_model.pipelines import make_dataset
from cxr_model.search import ConvNetHyperModel, SearchSpace, config_from_hparams, make_tuner, sample_config


def test_build_convnet_shapes_and_compile() -> None:
    cfg = ConvNetConfig(image_size=32, blocks=2, filters=8, dense_units=16)
    model = build_convnet(cfg)
    assert model.input_shape == (None, 32, 32, 1)
    assert model.output_shape == (None, 1)
    out = np.asarray(model(np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 1)).astype("float32")))
    assert out.shape == (3, 1) and ((out > 0) & (out < 1)).all()
    assert {m.name for m in model.metrics} >= {"loss", "compile_metrics"}
    assert [layer.name for layer in model.layers].count("dense") == 1


@pytest.mark.parametrize("blocks", [2, 3])
def test_block_count_and_width(blocks: int) -> None:
    model = build_convnet(ConvNetConfig(image_size=64, blocks=blocks, filters=8, max_filters=16, dense_units=0))
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 1 + blocks  # stem + one conv per block
    assert [c.filters for c in convs[1:]] == [min(8 * 2**b, 16) for b in range(blocks)]
    assert "dense" not in [layer.name for layer in model.layers]


def test_residual_blocks_add_a_shortcut_from_each_blocks_input(tmp_path: Path) -> None:
    # stem 8 -> block1 8 (width stays: identity shortcut) -> block2 16 (width changes: 1x1 projection)
    cfg = ConvNetConfig(image_size=32, blocks=2, filters=8, convs_per_block=2, dense_units=0, block="residual")
    model = build_convnet(cfg)
    names = [layer.name for layer in model.layers]
    assert {"block1_add", "block2_add", "block2_shortcut_conv"} <= set(names)
    assert "block1_shortcut_conv" not in names and model.get_layer("block2_shortcut_conv").kernel_size == (1, 1)
    plain_cfg = ConvNetConfig(**{**cfg.to_dict(), "block": "plain"})
    plain = build_convnet(plain_cfg)
    assert not any(name.endswith(("_add", "_shortcut_conv")) for name in [layer.name for layer in plain.layers])
    # block2's projection: 8 x 8 places (32 -> stem 16 -> pool 8), 8 -> 16 channels
    assert count_flops(cfg) - count_flops(plain_cfg) == 2 * 8 * 8 * 8 * 16
    # with block1's main path silenced the block passes its input through: ReLU(0 + x) = x for x >= 0
    for layer in ("block1_1_conv", "block1_2_conv"):
        model.get_layer(layer).kernel.assign(np.zeros(model.get_layer(layer).kernel.shape))
    for bn in ("block1_1_bn", "block1_2_bn"):  # BN of a zero map: beta, here 0 (untrained)
        assert not np.asarray(model.get_layer(bn).beta).any()
    probe = keras.Model(model.inputs, [model.get_layer("stem_relu").output, model.get_layer("block1_relu").output])
    x = np.random.default_rng(5).uniform(0, 255, (2, 32, 32, 1)).astype("float32")
    block_in, block_out = (np.asarray(t) for t in probe(x, training=False))
    np.testing.assert_allclose(block_out, block_in, atol=1e-5)
    assert block_in.std() > 0.1  # a real signal went through
    # saved and loaded like a plain convnet; Grad-CAM reads the last block's output after the shortcut
    from cxr_model.gradcam import last_feature_layer

    assert last_feature_layer(model) == "block2_relu"
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_allclose(predict_proba(model, x), predict_proba(loaded, x), rtol=1e-5, atol=1e-6)


def test_blurpool_keeps_what_the_coarser_grid_can_hold() -> None:
    pool = BlurPool2D()
    ones = np.ones((1, 7, 7, 2), "float32")
    out = np.asarray(pool(ones))
    assert out.shape == (1, 4, 4, 2)  # ceil(7 / 2)
    np.testing.assert_allclose(out, 1.0, atol=1e-6)  # reflected edges: a flat image stays flat, borders too
    # a checkerboard at the finest scale: plain subsampling reads all 0 or all 1 depending on a one-pixel shift
    board = (np.indices((16, 16)).sum(axis=0) % 2).astype("float32")[None, :, :, None]
    shifted = np.roll(board, 1, axis=2)
    assert board[:, ::2, ::2].max() == 0 and shifted[:, ::2, ::2].min() == 1  # aliasing
    pool = BlurPool2D()  # a layer is built for one channel count
    a, b = np.asarray(pool(board)), np.asarray(pool(shifted))
    np.testing.assert_allclose(a[:, 1:-1, 1:-1], 0.5, atol=1e-6)  # filtered away: mid-grey either way
    np.testing.assert_allclose(a[:, 1:-1, 1:-1], b[:, 1:-1, 1:-1], atol=1e-6)


def test_antialiased_convnet_filters_before_every_subsampling(tmp_path: Path) -> None:
    cfg = ConvNetConfig(image_size=32, blocks=2, filters=8, dense_units=0, antialias="all")
    model = build_convnet(cfg)
    pools = [layer for layer in model.layers if isinstance(layer, BlurPool2D)]
    assert [p.name for p in pools] == ["stem_blurpool", "block1_pool", "block2_pool"]
    assert model.get_layer("stem_conv").strides == (1, 1)  # the stem sees full resolution
    assert all(layer.strides == (1, 1) for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D))
    assert pools[-1].output.shape[1:3] == (4, 4)  # 32 -> 16 -> 8 -> 4, as without it
    plain = ConvNetConfig(**{**cfg.to_dict(), "antialias": "none"})
    assert build_convnet(plain).count_params() == model.count_params()  # the filters are fixed, not trained
    assert count_flops(cfg) > count_flops(plain)
    from cxr_model.gradcam import last_feature_layer

    assert last_feature_layer(model) == "block2_1_relu"  # the features, not their filtered copy
    stem_only = build_convnet(ConvNetConfig(**{**cfg.to_dict(), "antialias": "stem"}))
    assert [layer.name for layer in stem_only.layers if isinstance(layer, BlurPool2D)] == ["stem_blurpool"]
    assert all(layer.strides == (2, 2) for layer in stem_only.layers if isinstance(layer, keras.layers.MaxPooling2D))
    pools_only = ConvNetConfig(**{**cfg.to_dict(), "antialias": "pools"})
    pools_net = build_convnet(pools_only)
    assert [layer.name for layer in pools_net.layers if isinstance(layer, BlurPool2D)] == ["block1_pool", "block2_pool"]
    assert pools_net.get_layer("stem_conv").strides == (2, 2)  # the stem stays a strided conv
    assert pools_net.count_params() == model.count_params()
    stem_flops = count_flops(ConvNetConfig(**{**cfg.to_dict(), "antialias": "stem"}))
    pools_flops = count_flops(pools_only)
    base_flops = count_flops(plain)
    assert base_flops < pools_flops < count_flops(cfg) and base_flops < stem_flops < count_flops(cfg)
    # `all` is exactly both halves: the stem's extra FLOPs plus the pools' filters
    assert count_flops(cfg) - base_flops == (stem_flops - base_flops) + (pools_flops - base_flops)
    x = np.random.default_rng(7).uniform(0, 255, (2, 32, 32, 1)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_allclose(predict_proba(model, x), predict_proba(loaded, x), rtol=1e-5, atol=1e-6)


def test_standardization_removes_exposure_differences() -> None:
    x = np.random.default_rng(1).uniform(0, 100, (2, 16, 16, 1)).astype("float32")
    layer = PerImageStandardization()
    a, b = np.asarray(layer(x)), np.asarray(layer(x * 2.0 + 30.0))
    np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(a.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)


def test_fixed_rescaling_reads_a_grey_level_the_same_whatever_the_frame_holds() -> None:
    x = np.random.default_rng(6).uniform(0, 255, (2, 16, 16, 1)).astype("float32")
    wider = x.copy()
    wider[:, :4] = 0.0  # a dark border added around the same centre
    layer = FixedRescaling()
    np.testing.assert_allclose(np.asarray(layer(np.array([0.0, 127.5, 255.0]))), [-1.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(layer(wider))[:, 4:], np.asarray(layer(x))[:, 4:], atol=1e-6)
    # standardization reads the untouched pixels differently once the border is there
    assert not np.allclose(np.asarray(PerImageStandardization()(wider))[:, 4:],
                           np.asarray(PerImageStandardization()(x))[:, 4:], atol=0.05)


def test_equalization_ignores_any_monotone_exposure_curve() -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(1, 255, (3, 24, 24, 1)).astype("float32")
    x[0, :4] = 0.0  # a black border: 96 tied pixels
    layer = HistogramEqualization()
    a = np.asarray(layer(x))
    # gamma 0.5 and 2, and a log curve: standardization undoes only linear changes
    for curve in (lambda v: 255 * (v / 255) ** 0.5, lambda v: 255 * (v / 255) ** 2.0, lambda v: np.log1p(v) * 40):
        np.testing.assert_allclose(np.asarray(layer(curve(x).astype("float32"))), a, atol=2e-3)
    assert not np.allclose(np.asarray(PerImageStandardization()(255 * (x / 255) ** 0.5)),
                           np.asarray(PerImageStandardization()(x)), atol=0.05)
    assert len(np.unique(a[0, :4])) == 1  # ties share one value: the middle of their ranks
    np.testing.assert_allclose(a.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(a[1:].std(axis=(1, 2, 3)), 1.0, atol=0.01)  # no ties: uniform, unit variance
    order = np.argsort(x[1].ravel())
    assert (np.diff(a[1].ravel()[order]) > 0).all()  # each pixel keeps its rank


@pytest.mark.parametrize("intensity", ["standardize", "equalize", "rescale"])
def test_model_round_trips_through_keras_file(tmp_path: Path, intensity: str) -> None:
    model = build_convnet(ConvNetConfig(image_size=32, blocks=2, filters=8, intensity=intensity))
    assert model.layers[1].name == intensity
    x = np.random.default_rng(2).uniform(0, 255, (4, 32, 32, 1)).astype("uint8")
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_allclose(predict_proba(model, x), predict_proba(loaded, x), rtol=1e-5, atol=1e-6)


def test_weight_decay_shrinks_kernels_only() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 32, 32, 1)).astype("float32")
    y = (np.arange(8) % 2).astype("float32")
    lr, wd = 0.01, 0.5
    base = dict(image_size=32, blocks=2, filters=4, dense_units=4, dropout=0.0, learning_rate=lr)
    plain, decayed = build_convnet(ConvNetConfig(**base)), build_convnet(ConvNetConfig(**base, weight_decay=wd))
    assert isinstance(decayed.optimizer, keras.optimizers.AdamW) and not isinstance(plain.optimizer,
                                                                                      keras.optimizers.AdamW)
    decayed.set_weights(plain.get_weights())
    start = {v.path: v.numpy() for v in plain.trainable_variables}
    for model in (plain, decayed):  # one step on the same batch: the same gradients, the same Adam step
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    after = {v.path: v.numpy() for v in decayed.trainable_variables}
    for v in plain.trainable_variables:
        # AdamW subtracts lr * wd * w from each kernel besides the Adam step; biases and BN parameters get no decay
        expected = lr * wd * start[v.path] if v.name == "kernel" else np.zeros_like(start[v.path])
        np.testing.assert_allclose(v.numpy() - after[v.path], expected, atol=1e-6, err_msg=v.path)
    assert sum(v.name == "kernel" for v in plain.trainable_variables) >= 4


def test_sgd_takes_nesterov_momentum_steps_and_decays_kernels_only() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 32, 32, 1)).astype("float32")
    y = (np.arange(8) % 2).astype("float32")
    lr, wd = 0.01, 0.5
    base = dict(image_size=32, blocks=2, filters=4, dense_units=4, dropout=0.0, learning_rate=lr, optimizer="sgd")
    plain, decayed = build_convnet(ConvNetConfig(**base)), build_convnet(ConvNetConfig(**base, weight_decay=wd))
    for model in (plain, decayed):
        assert isinstance(model.optimizer, keras.optimizers.SGD)
        assert model.optimizer.nesterov and model.optimizer.momentum == 0.9
    decayed.set_weights(plain.get_weights())
    start = {v.path: v.numpy() for v in plain.trainable_variables}
    with tf.GradientTape() as tape:  # the batch's gradient, as the one step of `fit` below computes it
        loss = keras.losses.BinaryCrossentropy()(y[:, None], plain(x, training=True))
    gradient = dict(zip([v.path for v in plain.trainable_variables],
                        tape.gradient(loss, plain.trainable_variables), strict=True))
    plain.set_weights(decayed.get_weights())  # undo the forward pass's batch-norm statistics update
    for model in (plain, decayed):
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    after = {v.path: v.numpy() for v in decayed.trainable_variables}
    for v in plain.trainable_variables:
        # Nesterov's first step from zero velocity: v = -lr g, w += 0.9 v - lr g = -1.9 lr g
        np.testing.assert_allclose(v.numpy() - start[v.path], -1.9 * lr * gradient[v.path].numpy(), atol=2e-6,
                                   err_msg=v.path)
        # decay subtracts lr * wd * w from each kernel besides that step; biases and BN parameters get none
        expected = lr * wd * start[v.path] if v.name == "kernel" else np.zeros_like(start[v.path])
        np.testing.assert_allclose(v.numpy() - after[v.path], expected, atol=1e-6, err_msg=v.path)


def test_deep_net_on_small_input_stops_pooling() -> None:
    model = build_convnet(ConvNetConfig(image_size=16, blocks=5, filters=8))
    assert model.output_shape == (None, 1)


def test_count_flops_grows_with_size_and_shrinks_with_stride() -> None:
    base = ConvNetConfig(image_size=64)
    assert count_flops(ConvNetConfig(image_size=128)) == pytest.approx(4 * count_flops(base), rel=0.05)
    assert count_flops(ConvNetConfig(image_size=64, stem_stride=1)) > 3 * count_flops(base)


def test_augmentation_changes_train_images_only() -> None:
    aug = build_augmentation(rotation=0.1, zoom=0.1, translation=0.1, contrast=0.3, brightness=0.2, seed=0)
    x = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 1)).astype("float32")
    assert not np.allclose(np.asarray(aug(x, training=True)), x)
    np.testing.assert_allclose(np.asarray(aug(x, training=False)), x)
    assert np.asarray(aug(x, training=True)).min() >= 0 and np.asarray(aug(x, training=True)).max() <= 255


def test_augmentation_without_ranges_is_the_identity() -> None:
    x = np.random.default_rng(4).uniform(0, 255, (3, 24, 24, 1)).astype("float32")
    aug = build_augmentation(rotation=0, zoom=0, translation=0, contrast=0, brightness=0, gamma=0, seed=1)
    np.testing.assert_allclose(np.asarray(aug(x, training=True)), x, atol=1e-3)


def test_augmentation_shift_stays_within_its_range() -> None:
    x = np.zeros((16, 41, 41, 1), np.float32)
    x[:, 20, 20, 0] = 255.0  # one bright pixel in the centre
    moved = np.asarray(build_augmentation(0, 0, translation=0.1, contrast=0, brightness=0, seed=2)(x))
    rows, cols = np.indices((41, 41))
    weight = moved[..., 0].sum(axis=(1, 2))
    shift_r = (moved[..., 0] * rows).sum(axis=(1, 2)) / weight - 20
    shift_c = (moved[..., 0] * cols).sum(axis=(1, 2)) / weight - 20
    assert np.abs(shift_r).max() <= 4.1 + 1e-3 and np.abs(shift_c).max() <= 4.1 + 1e-3
    assert np.abs(shift_r).max() > 0.5  # it did move


def test_aspect_stretches_width_and_height_apart_within_range() -> None:
    x = np.zeros((32, 64, 64, 1), np.float32)
    x[:, 22:42, 22:42, 0] = 255.0  # a 20 x 20 square in the centre
    out = np.asarray(build_augmentation(0, 0, 0, contrast=0, brightness=0, aspect=0.4, seed=5)(x))[..., 0] > 127
    width, height = out.any(axis=1).sum(axis=1), out.any(axis=2).sum(axis=1)  # (32,) extents in pixels
    ratio = width / height
    assert ratio.min() < 0.95 and ratio.max() > 1.05  # stretched both ways across the batch
    assert np.all(np.abs(np.log(ratio)) <= 0.4 + 0.1)  # width:height within exp(+-0.4), plus a pixel of rounding
    assert np.abs(np.log(ratio)).max() > 0.25  # and uses most of that range
    assert np.all(np.abs(width * height / 400 - 1) < 0.25)  # area kept: a stretch, not a zoom


def test_affine_warp_puts_a_point_where_rotation_then_stretch_sends_it() -> None:
    import tensorflow as tf

    from cxr_model.augmentation import affine_transforms

    side, c = 81, 40.0
    q = np.array([52.0, 31.0])  # (x, y) of a bright pixel in the input
    x = np.zeros((1, side, side, 1), np.float32)
    x[0, int(q[1]), int(q[0]), 0] = 255.0
    angle, sx, sy, dx, dy = 0.4, 1.3, 0.8, 3.0, -2.0
    rows = affine_transforms(*(tf.constant([v], tf.float32) for v in (angle, sx, sy, dx, dy)), c, c)
    out = tf.raw_ops.ImageProjectiveTransformV3(images=x, transforms=rows, output_shape=[side, side],
                                                fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
    out = np.asarray(out)[0, ..., 0]
    ys, xs = np.indices(out.shape)
    got = np.array([(out * xs).sum(), (out * ys).sum()]) / out.sum()
    # forward map, written independently: content shifted, then turned by angle about the centre and stretched
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    expected = c + np.diag([sx, sy]) @ turn.T @ (q + np.array([dx, dy]) - c)
    np.testing.assert_allclose(got, expected, atol=0.6)


def test_gamma_changes_mid_tones_not_black_or_white() -> None:
    x = np.tile(np.array([0.0, 64.0, 255.0], np.float32), (8, 3, 1))[..., None]  # (8, 3, 3, 1)
    out = np.asarray(build_augmentation(0, 0, 0, contrast=0, brightness=0, gamma=0.5, seed=3)(x))
    np.testing.assert_allclose(out[..., 0, 0], 0.0, atol=1e-3)
    np.testing.assert_allclose(out[..., 2, 0], 255.0, atol=1e-2)
    assert np.ptp(out[:, 0, 1, 0]) > 5  # mid-grey moved, differently per image


def test_gamma_is_one_power_curve_per_image() -> None:
    x = np.tile(np.array([64.0, 128.0, 200.0], np.float32), (16, 3, 1))[..., None]  # (16, 3, 3, 1)
    out = np.asarray(build_augmentation(0, 0, 0, contrast=0, brightness=0, gamma=0.4, seed=7)(x))[:, 0, :, 0]
    gamma = np.log(out[:, 0] / 255) / np.log(64 / 255)  # each image's exponent, read off one grey level
    assert np.all(np.abs(np.log(gamma)) <= 0.4 + 1e-4) and np.ptp(gamma) > 0.2
    for level, column in ((128.0, 1), (200.0, 2)):  # the same exponent bends the other grey levels
        np.testing.assert_allclose(out[:, column], 255 * (level / 255) ** gamma, rtol=1e-4)


def test_noise_is_pixelwise_gaussian_with_a_random_sd_per_image() -> None:
    x = np.full((64, 48, 48, 1), 128.0, np.float32)
    aug = build_augmentation(0, 0, 0, contrast=0, brightness=0, noise=0.08, seed=8)
    first, second = np.asarray(aug(x))[..., 0] - 128, np.asarray(aug(x))[..., 0] - 128
    sd = first.std(axis=(1, 2))
    assert sd.max() <= 0.08 * 255 * 1.1 and sd.min() < 0.3 * sd.max()  # per-image sd within range, and spread
    loud = first[sd > 8]
    assert abs(np.corrcoef(loud[:, 1:].ravel(), loud[:, :-1].ravel())[0, 1]) < 0.05  # no structure between pixels
    assert not np.allclose(first, second)  # drawn anew for every batch
    corr = np.corrcoef(first.reshape(64, -1))[~np.eye(64, dtype=bool)]
    assert np.mean(np.abs(corr) > 0.5) < 0.1  # images of a batch seldom share a field (only by the bank's chance)


def test_noise_for_batches_of_unknown_size_is_drawn_fresh() -> None:
    import tensorflow as tf

    aug = build_augmentation(0, 0, 0, contrast=0, brightness=0, noise=0.08, seed=9)
    call = tf.function(lambda x: aug(x), input_signature=[tf.TensorSpec((None, None, None, 1), tf.float32)])
    out = np.asarray(call(np.full((4, 20, 30, 1), 128.0, np.float32)))
    assert out.shape == (4, 20, 30, 1) and out.std() > 1


def test_make_dataset_batches_float_images() -> None:
    x = np.zeros((10, 16, 16, 1), np.uint8)
    y = np.array([0, 1] * 5)
    batches = list(make_dataset(x, y, batch_size=4, shuffle=True, seed=0))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert batches[0][0].dtype.name == "float32"


def test_hypermodel_samples_the_search_space() -> None:
    hp = kt.HyperParameters()
    model = ConvNetHyperModel(image_size=32).build(hp)
    assert {"blocks", "filters", "convs_per_block", "dropout", "dense_units", "learning_rate"} <= set(hp.values)
    assert model.input_shape == (None, 32, 32, 1)
    cfg = config_from_hparams(hp.values, 32)
    assert cfg == sample_config(hp, 32)
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(hp.values["learning_rate"])


def test_config_from_hparams_rebuilds_a_trial() -> None:
    values = dict(blocks=5, filters=24, convs_per_block=2, dropout=0.4, dense_units=0, learning_rate=1e-3)
    cfg = config_from_hparams(values, 96)
    assert (cfg.blocks, cfg.filters, cfg.convs_per_block, cfg.dense_units, cfg.image_size) == (5, 24, 2, 0, 96)


def test_best_distinct_trials_skips_failed_trials_and_hyperband_reruns() -> None:
    from types import SimpleNamespace

    from cxr_model.search import best_distinct_trials

    def trial(name: str, score: float | None, blocks: int, status: str = "COMPLETED", **tuner_keys):
        values = dict(blocks=blocks, filters=16, **{f"tuner/{k}": v for k, v in tuner_keys.items()})
        return SimpleNamespace(trial_id=name, score=score, status=status,
                               hyperparameters=SimpleNamespace(values=values))

    trials = [trial("a", 0.90, 3, epochs=1), trial("b", 0.95, 4, epochs=1),
              trial("c", 0.97, 4, epochs=3, trial_id="b"),  # hyperband's next round of b: the same network
              trial("d", None, 5, status="FAILED"), trial("e", 0.80, 5), trial("f", None, 5, status="INVALID")]
    assert [t.trial_id for t in best_distinct_trials(trials, 2)] == ["c", "a"]
    assert [t.trial_id for t in best_distinct_trials(trials, 5)] == ["c", "a", "e"]  # never a failed trial
    assert best_distinct_trials([trial("d", None, 5, status="FAILED")], 1) == []


@pytest.mark.parametrize("kind", ["random", "bayesian", "hyperband"])
def test_tuner_runs_and_resumes(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 32, 32, 1)).astype("uint8")
    y = np.array([0, 1] * 8)
    ds = make_dataset(x, y, batch_size=8)

    def tuner(resume: bool):
        return make_tuner(kind, ConvNetHyperModel(32), tmp_path, "t", max_trials=1, search_epochs=1, seed=0,
                          resume=resume)

    first = tuner(resume=False)
    first.search(ds, validation_data=ds, epochs=1, verbose=0)
    done = len(first.oracle.trials)
    assert done >= 1
    assert all(t.status == "COMPLETED" and t.score is not None for t in first.oracle.trials.values())
    resumed = tuner(resume=True)
    assert len(resumed.oracle.trials) == done  # state reloaded from disk, not started over
    assert tuner(resume=False).oracle.trials == {}  # a fresh search wipes the state


def test_search_space_bounds_are_respected(tmp_path: Path) -> None:
    space = SearchSpace(blocks=(3, 3), filters=(8,), convs_per_block=(1, 1), dropout=(0.1, 0.5), dense_units=(0,),
                        learning_rate=(3e-4, 3e-3), fixed={"stem_stride": 1})
    tuner = make_tuner("random", ConvNetHyperModel(32, space), tmp_path, "s", max_trials=5, search_epochs=1, seed=0,
                       resume=False)
    for _ in range(5):  # draw values the way the search does, without training
        hp = tuner.oracle.populate_space(f"t{_}")["values"]
        if hp is None:
            break
        cfg = config_from_hparams(hp, 32, space)
        assert (cfg.blocks, cfg.filters, cfg.convs_per_block, cfg.dense_units, cfg.stem_stride) == (3, 8, 1, 0, 1)
        assert 0.1 <= cfg.dropout <= 0.5 and 3e-4 <= cfg.learning_rate <= 3e-3


def test_resolution_loss_blurs_by_a_random_amount_and_keeps_exposure() -> None:
    import tensorflow as tf

    tf.random.set_seed(0)  # with the op seeds, the same draws whatever ran before
    x = np.zeros((16, 32, 32, 1), np.float32)
    x[:, ::2, :, 0] = 255.0  # one-pixel stripes: all of their energy is at the finest scale
    out = np.asarray(build_augmentation(0, 0, 0, contrast=0, brightness=0, resolution=0.6, seed=4)(x))[..., 0]
    detail = np.abs(np.diff(out, axis=1)).mean(axis=(1, 2)) / 255  # 1.0 for the sharp stripes
    assert detail.min() < 0.7  # detail lost for real
    assert np.ptp(detail) > 0.1  # by a different amount per image
    np.testing.assert_allclose(out.mean(axis=(1, 2)), 127.5, atol=8)  # blurred, not darkened or brightened


def test_band_erasing_blanks_whole_rows_at_top_and_bottom_within_range() -> None:
    import tensorflow as tf

    tf.random.set_seed(0)
    x = np.full((32, 40, 40, 1), 200.0, np.float32)
    out = np.asarray(build_augmentation(0, 0, 0, contrast=0, brightness=0, erase=0.25, seed=6)(x))[..., 0]
    blank = out == 0
    np.testing.assert_array_equal(blank.all(axis=2), blank.any(axis=2))  # whole rows, never part of one
    rows = blank.all(axis=2)  # (32, 40)
    top = np.argmin(rows, axis=1)  # blank rows before the first kept one
    bottom = np.argmin(rows[:, ::-1], axis=1)
    assert top.max() <= 10 and bottom.max() <= 10  # at most 25% of 40 rows each
    assert top.max() >= 6 and bottom.max() >= 6 and top.min() <= 2  # uses its range, differently per image
    assert not np.array_equal(top, bottom)  # top and bottom drawn apart
    np.testing.assert_array_equal(out[~blank], 200.0)  # the rest untouched


def test_view_magnifies_and_stretches_about_the_centre() -> None:
    from cxr_model.augmentation import warp_view

    x = np.zeros((1, 65, 65, 1), np.float32)
    x[:, 22:42, 22:42, 0] = 255.0  # a 20 x 20 square in the centre

    def extents(scale: float, ratio: float) -> tuple[int, int]:
        out = np.asarray(warp_view(x, scale, ratio))[0, ..., 0] > 127
        return int(out.any(axis=0).sum()), int(out.any(axis=1).sum())  # width, height

    assert extents(1.0, 1.0) == (20, 20)
    width, height = extents(1.2, 1.0)
    assert abs(width - 24) <= 1 and abs(height - 24) <= 1
    width, height = extents(1.0, 1.21)  # width:height 1.21 at the same area: 22 x 18.2
    assert abs(width - 22) <= 1 and abs(height - 18.2) <= 1


def test_forward_over_views_is_the_mean_of_each_view() -> None:
    import tensorflow as tf

    from cxr_model.augmentation import warp_view
    from cxr_model.config import TTA_VIEWS
    from cxr_model.inference import compile_forward

    model = build_convnet(ConvNetConfig(image_size=32, blocks=2, filters=8, dense_units=0))
    x = np.random.default_rng(5).uniform(0, 255, (5, 32, 32, 1)).astype("uint8")
    views = TTA_VIEWS["scale+aspect"]
    each = [np.asarray(model(warp_view(tf.cast(x, tf.float32), s, r), training=False))[:, 0] for s, r in views]
    got = compile_forward(model, batch_size=2, views=views)(x)  # batches of 2 images x 5 views, last one short
    np.testing.assert_allclose(got, np.mean(each, axis=0), rtol=0, atol=1e-6)
    assert np.abs(got - each[0]).max() > 1e-4  # the views do change the answer
    np.testing.assert_allclose(compile_forward(model)(x), each[0], rtol=0, atol=1e-6)  # default: the image alone
    with pytest.raises(ValueError, match="at least one view"):
        compile_forward(model, views=())


def test_separable_blocks_filter_each_channel_then_mix_and_count_their_flops(tmp_path: Path) -> None:
    """`block="separable"`: every block conv is a depthwise 3x3 plus a 1x1 mix; the stem stays a full conv."""
    cfg = ConvNetConfig(image_size=32, blocks=2, filters=8, convs_per_block=1, dense_units=0, block="separable")
    model = build_convnet(cfg)
    seps = [layer for layer in model.layers if isinstance(layer, keras.layers.SeparableConv2D)]
    assert [layer.name for layer in seps] == ["block1_1_sepconv", "block2_1_sepconv"]
    assert isinstance(model.get_layer("stem_conv"), keras.layers.Conv2D)
    # block2: 8 -> 16 channels at 8 x 8 places: 9*8 depthwise + 8*16 pointwise weights, no bias
    assert model.get_layer("block2_1_sepconv").count_params() == 9 * 8 + 8 * 16
    plain_cfg = ConvNetConfig(**{**cfg.to_dict(), "block": "plain"})
    # stem 32 -> 16 (8 channels, its minimum), block1 at 16 x 16 (8 -> 8), block2 at 8 x 8 (8 -> 16)
    saved = (2 * 16 * 16 * (9 * 8 * 8 - (9 * 8 + 8 * 8)) + 2 * 8 * 8 * (9 * 8 * 16 - (9 * 8 + 8 * 16)))
    assert count_flops(plain_cfg) - count_flops(cfg) == saved
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)).astype("float32")
    path = tmp_path / "sep.keras"
    model.save(path)
    np.testing.assert_allclose(keras.models.load_model(path)(x, training=False), model(x, training=False), atol=1e-6)
    from cxr_model.gradcam import gradcam

    assert gradcam(model, x.astype("uint8")).shape == (2, 32, 32)


def test_gapmax_head_pools_by_mean_and_max_side_by_side(tmp_path) -> None:
    from cxr_model.gradcam import gradcam

    base = dict(image_size=32, blocks=2, filters=4, dense_units=8, dropout=0.0)
    model = build_convnet(ConvNetConfig(**base, head="gapmax"))
    features = model.get_layer("block2_pool").output.shape[-1]
    assert model.get_layer("gap_gmp").output.shape == (None, 2 * features)
    # the head's dense layer sees twice the features of the average-pooling head: 2 * C * dense more FLOPs
    plain = count_flops(ConvNetConfig(**base))
    assert count_flops(ConvNetConfig(**base, head="gapmax")) - plain == 2 * features * 8
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 1)).astype("uint8")
    gap_out = keras.Model(model.inputs, model.get_layer("gap_gmp").output)(x.astype("float32")).numpy()
    last = keras.Model(model.inputs, model.get_layer("block2_pool").output)(x.astype("float32")).numpy()
    np.testing.assert_allclose(gap_out[:, :features], last.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gap_out[:, features:], last.max(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_allclose(predict_proba(model, x), predict_proba(loaded, x), rtol=1e-5, atol=1e-6)
    assert gradcam(loaded, x).shape == (3, 32, 32)
