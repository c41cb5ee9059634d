"""Keras-Tuner hypermodel and tuner factory: sampling hp values, nothing else."""

from __future__ import annotations

from pathlib import Path

import keras_tuner as kt

from cxr_model.model import ConvNetConfig, build_convnet

OBJECTIVE = kt.Objective("val_auc", direction="max")
TUNERS = {"random": kt.RandomSearch, "bayesian": kt.BayesianOptimization, "hyperband": kt.Hyperband}


def sample_config(hp: kt.HyperParameters, image_size: int) -> ConvNetConfig:
    """Draw one architecture from the search space: blocks, filters, dropout, dense width, learning rate."""
    return ConvNetConfig(
        image_size=image_size,
        blocks=hp.Int("blocks", 3, 5),
        filters=hp.Choice("filters", [16, 24, 32]),
        convs_per_block=hp.Int("convs_per_block", 1, 2),
        dropout=hp.Float("dropout", 0.1, 0.5, step=0.1),
        dense_units=hp.Choice("dense_units", [0, 64, 128]),
        learning_rate=hp.Float("learning_rate", 3e-4, 3e-3, sampling="log"),
    )


def config_from_hparams(values: dict, image_size: int) -> ConvNetConfig:
    """Rebuild the ConvNetConfig of a finished trial from its hyperparameter values."""
    hp = kt.HyperParameters()
    for name, value in values.items():
        hp.Fixed(name, value)
    return sample_config(hp, image_size)


class ConvNetHyperModel(kt.HyperModel):
    """Builds `build_convnet(sample_config(hp))` for one fixed input size."""

    def __init__(self, image_size: int):
        super().__init__(name="cxr_convnet")
        self.image_size = image_size

    def build(self, hp: kt.HyperParameters):
        return build_convnet(sample_config(hp, self.image_size))


def make_tuner(
    kind: str,
    hypermodel: kt.HyperModel,
    directory: str | Path,
    project_name: str,
    max_trials: int,
    search_epochs: int,
    seed: int,
    resume: bool,
    base: type | None = None,
) -> kt.Tuner:
    """A tuner whose state lives in `directory/project_name`; resume=True continues it.

    `base` is an optional mixin class placed before the tuner class (used to add per-trial logging).
    """
    tuner_cls = TUNERS[kind]
    if base is not None:
        tuner_cls = type(f"{base.__name__}{tuner_cls.__name__}", (base, tuner_cls), {})
    kwargs = dict(
        hypermodel=hypermodel, objective=OBJECTIVE, seed=seed, directory=str(directory),
        project_name=project_name, overwrite=not resume,
    )
    if kind == "hyperband":
        kwargs.update(max_epochs=search_epochs, factor=3, hyperband_iterations=1)
    else:
        kwargs.update(max_trials=max_trials)
    return tuner_cls(**kwargs)
