"""Process set-up for TensorFlow: thread pools, fixed before the first op runs."""

from __future__ import annotations

import tensorflow as tf


def configure_threads(intra_op: int | None, inter_op: int | None = None) -> None:
    """Fix TensorFlow's thread pools before the first op runs (no effect afterwards); None keeps TF's choice."""
    try:
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:  # TensorFlow already initialised: keep its pools
        pass
