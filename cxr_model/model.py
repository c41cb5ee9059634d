"""The convnet: plain Keras code that takes ordinary arguments (the hypermodel only samples them)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from cxr_model.config import Antialias, Block, Head, Intensity, Optimizer


@dataclass(frozen=True)
class ConvNetConfig:
    image_size: int = 128  # input side in pixels; input is (B, S, S, 1) grayscale, 0..255
    blocks: int = 4  # conv blocks after the stem; each halves the resolution
    filters: int = 32  # filters of the first block, doubled per block (capped at max_filters)
    max_filters: int = 256
    convs_per_block: int = 1  # 3x3 conv + BN + ReLU repeats inside a block
    # plain: the block's convs in a chain; residual: their output plus a shortcut from the block's input (identity
    # where the width stays, a 1x1 conv + BN where it changes) before the last ReLU, as in ResNet (He et al. 2016);
    # separable: each block conv is depthwise-separable (MobileNet, Xception; the stem stays a full conv)
    block: Block = "plain"
    # anti-aliased downsampling (Zhang 2019; `BlurPool2D`): stem: the stem convolves at full resolution, then
    # low-pass filters before it subsamples; pools: each max-pool takes its 2x2 max at every place, then filters
    # and subsamples (the stem stays a strided conv); all: both
    antialias: Antialias = "none"
    stem_stride: int = 2  # 2 halves the resolution up front: ~4x fewer FLOPs per image
    # gap: global average pooling (how much of each feature); flatten: keeps where a feature sits; gapmax: average
    # and max pooling side by side (also how strongly it shows at its strongest place, e.g. one consolidation)
    head: Head = "gap"
    # standardize: zero mean, unit variance per image; equalize: each pixel's rank within its image (histogram
    # equalization), the same for every monotone exposure curve; rescale: 0..255 -> -1..1 for every image alike
    intensity: Intensity = "standardize"
    dropout: float = 0.3  # after the pooling / flatten
    dense_units: int = 64  # 0 = no hidden dense layer
    learning_rate: float = 1e-3
    label_smoothing: float = 0.0
    # decoupled weight decay (AdamW, Loshchilov & Hutter 2019) of the conv and dense kernels; 0 = plain Adam
    weight_decay: float = 0.0
    # Polyak averaging: the weights evaluated, kept and saved are an exponential moving average of the trained
    # ones, new = ema * old + (1 - ema) * current after every step (`use_ema` of the Keras optimizer); 0 = off
    ema: float = 0.0
    # adam, or sgd: plain SGD with Nesterov momentum 0.9 (Sutskever et al. 2013), whose steps do not adapt to
    # each weight's gradient history; its learning rate runs about 10x Adam's (0.1 per 256 images, Goyal et al.
    # 2017, is 0.0125 at batch 32). Weight decay, if set, is decoupled for either
    optimizer: Optimizer = "adam"

    @property
    def blurred_stem(self) -> bool:
        """The stem convolves at full resolution and `BlurPool2D` subsamples (anti-aliasing of a stride-2 stem)."""
        return self.antialias in ("stem", "all") and self.stem_stride == 2

    @property
    def blurred_pools(self) -> bool:
        """Each max-pool runs at stride 1 and `BlurPool2D` subsamples (anti-aliasing of the max-pools)."""
        return self.antialias in ("pools", "all")

    def to_dict(self) -> dict:
        return asdict(self)


@keras.saving.register_keras_serializable(package="cxr_model")
class PerImageStandardization(layers.Layer):
    """Zero mean, unit variance per image: removes exposure and contrast differences between scanners."""

    def call(self, x):
        mean = keras.ops.mean(x, axis=(1, 2, 3), keepdims=True)
        var = keras.ops.var(x, axis=(1, 2, 3), keepdims=True)
        return (x - mean) / keras.ops.sqrt(var + 1e-6)


@keras.saving.register_keras_serializable(package="cxr_model")
class HistogramEqualization(layers.Layer):
    """Each pixel becomes its mid-rank within its own image, centred and scaled to unit variance.

    A global histogram equalization: any monotone change of the exposure curve (gamma, brightness, contrast,
    window and level) leaves the output the same, which per-image standardization only achieves for linear
    changes. Ties (a black border, a burnt-out corner) share the middle of their ranks, so a constant region maps
    to one value. The output is uniform on about (-1.73, 1.73) for an image without ties: zero mean, unit variance.
    Not differentiable with respect to the input (ranks); nothing here needs that gradient.
    """

    def call(self, x):
        shape = tf.shape(x)
        flat = tf.reshape(x, (shape[0], -1))  # (B, N)
        ordered = tf.sort(flat, axis=1)
        below = tf.searchsorted(ordered, flat, side="left")  # pixels strictly darker
        not_above = tf.searchsorted(ordered, flat, side="right")  # pixels darker or as dark
        n = tf.cast(tf.shape(flat)[1], x.dtype)
        cdf = tf.cast(below + not_above, x.dtype) / (2.0 * n)  # mid-rank in (0, 1)
        return tf.reshape((cdf - 0.5) * math.sqrt(12.0), shape)  # uniform(0, 1) has variance 1/12

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="cxr_model")
class FixedRescaling(layers.Layer):
    """0..255 to -1..1, the same affine map for every image (the reference notebook divides by 255).

    Per-image standardization and equalization measure a pixel against the rest of its frame, so a wider field
    of view (more dark background) or a brighter abdomen changes how bright the lungs read; here a grey level
    reads the same whatever else the frame holds, and exposure differences are left to the augmentation.
    """

    def call(self, x):
        return x / 127.5 - 1.0


INTENSITY_LAYERS = {"standardize": PerImageStandardization, "equalize": HistogramEqualization,
                    "rescale": FixedRescaling}


@keras.saving.register_keras_serializable(package="cxr_model")
class BlurPool2D(layers.Layer):
    """Low-pass, then keep every second pixel: a fixed [1, 2, 1] x [1, 2, 1] / 16 filter per channel, stride 2.

    Plain stride-2 subsampling (a strided conv, the max-pool's stride) aliases: detail finer than the new grid
    folds into coarse patterns that move with a one-pixel shift and vanish when the scan is a little blurrier.
    Filtering first keeps only what the coarser grid can hold (Zhang, "Making Convolutional Networks
    Shift-Invariant Again", ICML 2019). Edges are reflected, so a border does not darken.
    """

    def build(self, input_shape):
        taps = tf.constant([1.0, 2.0, 1.0])
        kernel = tf.tensordot(taps, taps, axes=0) / 16.0  # (3, 3), sums to 1
        self.kernel = tf.tile(kernel[:, :, None, None], (1, 1, int(input_shape[-1]), 1))  # (3, 3, C, 1)

    def call(self, x):
        x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="REFLECT")
        return tf.nn.depthwise_conv2d(x, self.kernel, strides=[1, 2, 2, 1], padding="VALID")

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        return b, None if h is None else -(-h // 2), None if w is None else -(-w // 2), c


def _conv_bn_relu(x, filters: int, strides: int = 1, name: str = "", kernel: int = 3, relu: bool = True,
                  separable: bool = False):
    if separable:  # a 3x3 filter per input channel, then a 1x1 mix across channels (MobileNet, Xception)
        x = layers.SeparableConv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                                   name=f"{name}_sepconv")(x)
    else:
        x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    # momentum 0.9 (Keras: 0.99): moving statistics settle within ~50 steps, so the validation score of a
    # 2-epoch search trial measures the weights, not half-initialised batch-norm statistics.
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _block(x, filters: int, convs: int, residual: bool, name: str, separable: bool = False):
    """`convs` 3x3 conv + BN + ReLU in a chain; residual: the input's shortcut joins before the last ReLU;
    separable: each conv is depthwise-separable."""
    inputs = x
    for c in range(convs):
        x = _conv_bn_relu(x, filters, name=f"{name}_{c + 1}", relu=not (residual and c == convs - 1),
                          separable=separable)
    if not residual:
        return x
    shortcut = inputs if inputs.shape[-1] == filters else _conv_bn_relu(
        inputs, filters, kernel=1, relu=False, name=f"{name}_shortcut")  # projection where the width changes
    x = layers.Add(name=f"{name}_add")([x, shortcut])
    return layers.ReLU(name=f"{name}_relu")(x)


def build_convnet(cfg: ConvNetConfig, name: str = "cxr_convnet", compile: bool = True) -> keras.Model:
    """Binary classifier, compiled for training unless `compile=False`; preprocessing lives inside the model."""
    inputs = keras.Input((cfg.image_size, cfg.image_size, 1), name="image")  # (B, S, S, 1) 0..255
    x = INTENSITY_LAYERS[cfg.intensity](name=cfg.intensity)(inputs)
    stem = max(cfg.filters // 2, 8)
    if cfg.blurred_stem:  # convolve at full resolution, then filter and subsample
        x = BlurPool2D(name="stem_blurpool")(_conv_bn_relu(x, stem, name="stem"))
    else:
        x = _conv_bn_relu(x, stem, strides=cfg.stem_stride, name="stem")  # (B, S/2, S/2, F/2)
    for b in range(cfg.blocks):
        width = min(cfg.filters * 2**b, cfg.max_filters)
        x = _block(x, width, cfg.convs_per_block, cfg.block == "residual", name=f"block{b + 1}",
                   separable=cfg.block == "separable")
        if x.shape[1] >= 2:  # small inputs run out of resolution before they run out of blocks
            if cfg.blurred_pools:  # the max over each 2x2 window at every place, then filter and subsample
                x = layers.MaxPooling2D(strides=1, padding="same", name=f"block{b + 1}_maxpool")(x)
                x = BlurPool2D(name=f"block{b + 1}_pool")(x)
            else:
                x = layers.MaxPooling2D(name=f"block{b + 1}_pool")(x)  # halves H and W
    # flatten: the dense layer sees where in the frame each feature is (B, H*W*C); gap: only how much (B, C)
    if cfg.head == "flatten":
        x = layers.Flatten(name="flatten")(x)
    elif cfg.head == "gapmax":
        x = layers.Concatenate(name="gap_gmp")([layers.GlobalAveragePooling2D(name="gap")(x),
                                                 layers.GlobalMaxPooling2D(name="gmp")(x)])  # (B, 2C)
    else:
        x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(cfg.dropout, name="dropout")(x)
    if cfg.dense_units:
        x = layers.Dense(cfg.dense_units, activation="relu", name="dense")(x)
        x = layers.Dropout(cfg.dropout / 2, name="dense_dropout")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="pneumonia")(x)  # (B, 1) probability
    model = keras.Model(inputs, outputs, name=name)
    if not compile:
        return model
    averaging = dict(use_ema=True, ema_momentum=cfg.ema) if cfg.ema else {}
    if cfg.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(cfg.learning_rate, momentum=0.9, nesterov=True,
                                         weight_decay=cfg.weight_decay or None, **averaging)
    elif cfg.weight_decay:
        optimizer = keras.optimizers.AdamW(cfg.learning_rate, weight_decay=cfg.weight_decay, **averaging)
    else:
        optimizer = keras.optimizers.Adam(cfg.learning_rate, **averaging)
    if cfg.weight_decay:
        # kernels only: shrinking biases and batch-norm scales towards 0 is not a penalty on complexity
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=[
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.AUC(name="auc"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
        ],
    )
    return model


def mean_ensemble(configs: ConvNetConfig | Sequence[ConvNetConfig], weights: list[list]) -> keras.Model:
    """One model whose probability is the mean over convnets, one per set of `weights`.

    `configs` is one architecture for every set, or one per set (the networks of different search trials,
    `TrainConfig.top_trials`); all take the same input size. With a single set it is the plain convnet with
    those weights. Several sets (the best epochs of a training run, `cxr_model.train.BestSnapshots`,
    independently trained members, `TrainConfig.members`, other trials' networks) become sub-models `member1`,
    `member2`, ... of one functional model, so evaluation, test-time views, Grad-CAM and serving take it as they
    take a convnet.
    """
    if not weights:
        raise ValueError("mean_ensemble needs at least one set of weights")
    configs = [configs] * len(weights) if isinstance(configs, ConvNetConfig) else list(configs)
    if len(configs) != len(weights):
        raise ValueError(f"mean_ensemble got {len(configs)} architectures for {len(weights)} sets of weights")
    if len({c.image_size for c in configs}) > 1:
        raise ValueError(f"members take different input sizes: {sorted({c.image_size for c in configs})}")
    if len(weights) == 1:
        model = build_convnet(configs[0])
        model.set_weights(weights[0])
        return model
    members = []
    for i, (cfg, w) in enumerate(zip(configs, weights, strict=True), start=1):
        member = build_convnet(cfg, name=f"member{i}", compile=False)  # inference only: no optimizer to save
        member.set_weights(w)
        members.append(member)
    side = configs[0].image_size
    inputs = keras.Input((side, side, 1), name="image")  # (B, S, S, 1) 0..255
    outputs = layers.Average(name="pneumonia")([member(inputs) for member in members])  # (B, 1)
    return keras.Model(inputs, outputs, name="cxr_ensemble")


def ensemble_members(model: keras.Model) -> list[keras.Model]:
    """The convnets a `mean_ensemble` averages; [model] for a plain convnet."""
    members = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return members or [model]


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


def count_flops(cfg: ConvNetConfig) -> int:
    """Forward multiply-adds x2 of the conv and dense layers for one image (training step ~3x this)."""
    side, channels, flops = cfg.image_size, 1, 0
    stem = max(cfg.filters // 2, 8)
    blur = cfg.blurred_stem
    if blur:  # the stem convolves at full resolution, then filters
        flops += 2 * side * side * 9 * channels * stem
    side = -(-side // cfg.stem_stride)
    flops += 2 * side * side * 9 * stem * (1 if blur else channels)  # the blur (per channel) or the strided conv
    channels = stem
    for b in range(cfg.blocks):
        width = min(cfg.filters * 2**b, cfg.max_filters)
        if cfg.block == "residual" and channels != width:  # the 1x1 projection of the shortcut
            flops += 2 * side * side * channels * width
        for _ in range(cfg.convs_per_block):
            if cfg.block == "separable":  # depthwise 3x3 per input channel, then the 1x1 pointwise mix
                flops += 2 * side * side * (9 * channels + channels * width)
            else:
                flops += 2 * side * side * 9 * channels * width
            channels = width
        if cfg.blurred_pools and side >= 2:  # 3x3 per-channel filter at the halved side
            half = -(-side // 2)  # the filter's output side: ceil(side / 2)
            flops += 2 * half * half * 9 * channels
        side = side // 2 if side >= 2 else side
    features = channels * {"flatten": side * side, "gapmax": 2}.get(cfg.head, 1)
    if cfg.dense_units:
        flops += 2 * features * cfg.dense_units + 2 * cfg.dense_units
    else:
        flops += 2 * features
    return flops
