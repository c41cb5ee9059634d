"""The convnet: plain Keras code that takes ordinary arguments (the hypermodel only samples them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import keras
from keras import layers

from cxr_model.config import Antialias, Block, Head, Intensity, Optimizer, TrainConfig
from cxr_model.layers import INTENSITY_LAYERS, BlurPool2D


def _setting(name: str):
    """TrainConfig's default of one of its settings: the network's defaults are declared there, once."""
    return TrainConfig.model_fields[name].default


@dataclass(frozen=True)
class ConvNetConfig:
    image_size: int = _setting("image_size")  # input side in pixels; input is (B, S, S, 1) grayscale, 0..255
    blocks: int = 4  # conv blocks after the stem; each halves the resolution
    filters: int = 32  # filters of the first block, doubled per block (capped at max_filters)
    max_filters: int = 256
    convs_per_block: int = 1  # 3x3 conv + BN + ReLU repeats inside a block
    # plain: the block's convs in a chain; residual: their output plus a shortcut from the block's input (identity
    # where the width stays, a 1x1 conv + BN where it changes) before the last ReLU, as in ResNet (He et al. 2016);
    # separable: each block conv is depthwise-separable (MobileNet, Xception; the stem stays a full conv)
    block: Block = _setting("block")
    # anti-aliased downsampling (Zhang 2019; `BlurPool2D`): stem: the stem convolves at full resolution, then
    # low-pass filters before it subsamples; pools: each max-pool takes its 2x2 max at every place, then filters
    # and subsamples (the stem stays a strided conv); all: both
    antialias: Antialias = _setting("antialias")
    stem_stride: int = 2  # 2 halves the resolution up front: ~4x fewer FLOPs per image
    # gap: global average pooling (how much of each feature); flatten: keeps where a feature sits; gapmax: average
    # and max pooling side by side (also how strongly it shows at its strongest place, e.g. one consolidation)
    head: Head = _setting("head")
    # standardize: zero mean, unit variance per image; equalize: each pixel's rank within its image (histogram
    # equalization), the same for every monotone exposure curve; rescale: 0..255 -> -1..1 for every image alike
    intensity: Intensity = _setting("intensity")
    dropout: float = 0.3  # after the pooling / flatten
    dense_units: int = 64  # 0 = no hidden dense layer
    learning_rate: float = 1e-3
    label_smoothing: float = _setting("label_smoothing")
    # decoupled weight decay (AdamW, Loshchilov & Hutter 2019) of the conv and dense kernels; 0 = plain Adam
    weight_decay: float = _setting("weight_decay")
    # Polyak averaging: the weights evaluated, kept and saved are an exponential moving average of the trained
    # ones, new = ema * old + (1 - ema) * current after every step (`use_ema` of the Keras optimizer); 0 = off
    ema: float = _setting("ema")
    # adam, or sgd: plain SGD with Nesterov momentum 0.9 (Sutskever et al. 2013), whose steps do not adapt to
    # each weight's gradient history; its learning rate runs about 10x Adam's (0.1 per 256 images, Goyal et al.
    # 2017, is 0.0125 at batch 32). Weight decay, if set, is decoupled for either
    optimizer: Optimizer = _setting("optimizer")

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
    those weights. Several sets (the best epochs of a training run, `cxr_model.callbacks.BestSnapshots`,
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


COUNTED_LAYERS = (layers.Conv2D, layers.SeparableConv2D, layers.DepthwiseConv2D, layers.Dense, BlurPool2D)


def count_flops(model: keras.Model | ConvNetConfig) -> int:
    """Forward multiply-adds x2 for one image (a training step costs ~3x this), read off the built model.

    Counts the convolutions (full, depthwise and separable), the anti-aliasing filters and the dense layers at
    their output sizes; pooling, normalisation and activations are left out. An ensemble counts every member.
    A ConvNetConfig is built first (uncompiled).
    """
    if isinstance(model, ConvNetConfig):
        model = build_convnet(model, compile=False)
    flops = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):  # a member of a mean_ensemble
            flops += count_flops(layer)
            continue
        if not isinstance(layer, COUNTED_LAYERS):
            continue
        out = layer.output.shape  # (B, H, W, C) or (B, units)
        cin = int(layer.input.shape[-1])
        if isinstance(layer, layers.Dense):
            flops += 2 * cin * int(out[-1])
            continue
        pixels = int(out[1]) * int(out[2])
        if isinstance(layer, BlurPool2D):  # a fixed 3x3 filter per channel
            flops += 2 * pixels * 9 * cin
        elif isinstance(layer, layers.SeparableConv2D):  # a kxk filter per input channel, then the 1x1 mix
            k = layer.kernel_size[0] * layer.kernel_size[1]
            flops += 2 * pixels * (k * cin + cin * int(out[-1]))
        elif isinstance(layer, layers.DepthwiseConv2D):
            flops += 2 * pixels * layer.kernel_size[0] * layer.kernel_size[1] * int(out[-1])
        else:
            flops += 2 * pixels * layer.kernel_size[0] * layer.kernel_size[1] * cin * int(out[-1])
    return flops
