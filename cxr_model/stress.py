"""Stressed validation: the validation images under shifts another scanner or hospital could cause.

Validation carved from train is nearly separable (ROC AUC ~0.99), so it says little about how a model fares on
images acquired elsewhere. These copies model that: a brighter and a darker exposure curve, blur from half the
native resolution, a 20% wider field of view, sensor noise, and a chest 20% narrower or broader, as a scan of
another shape gives once squashed to a square. They are used to compare recipes (benchmarks/recipe.py), view
sets (benchmarks/tta.py) and threshold rules (benchmarks/threshold.py), and by the stressed_ threshold rules
of a run; never on test.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

STRESSES = ("gamma0.6", "gamma1.6", "blur", "wider_view", "noise", "narrower", "broader")


def stresses(x: np.ndarray) -> dict[str, np.ndarray]:
    """Each stress of uint8 images (N, S, S, 1), as uint8 images of the same shape, keyed by `STRESSES`."""
    f = x.astype(np.float32) / 255.0
    side = x.shape[1]
    small = tf.image.resize(f, (side // 2, side // 2), antialias=True)
    wide = tf.image.resize(tf.image.pad_to_bounding_box(f, side // 10, side // 10, side + side // 5,
                                                        side + side // 5), (side, side), antialias=True)
    noise = np.random.default_rng(0).normal(0, 0.03, f.shape).astype(np.float32)
    narrow = round(side * 0.8)  # a scan 20% narrower than the training scans once squashed to a square
    slim = tf.image.pad_to_bounding_box(tf.image.resize(f, (side, narrow), antialias=True), 0, (side - narrow) // 2,
                                        side, side)
    broad = tf.image.crop_to_bounding_box(tf.image.resize(f, (side, side + side - narrow), antialias=True), 0,
                                          (side - narrow) // 2, side, side)  # 20% wider
    out = {"gamma0.6": f**0.6, "gamma1.6": f**1.6, "blur": tf.image.resize(small, (side, side)).numpy(),
           "wider_view": wide.numpy(), "noise": f + noise, "narrower": slim.numpy(), "broader": broad.numpy()}
    assert tuple(out) == STRESSES
    return {k: np.clip(np.rint(v * 255), 0, 255).astype(np.uint8) for k, v in out.items()}


def stressed_scores(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    """`predict` (uint8 images -> probabilities) over each stressed copy of `x`, keyed by `STRESSES`."""
    return {name: predict(images) for name, images in stresses(x).items()}
