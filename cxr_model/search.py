"""Keras-Tuner hypermodel and tuner factory: sampling hp values, nothing else."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import keras_tuner as kt

from cxr_model.model import ConvNetConfig, build_convnet

OBJECTIVE = kt.Objective("val_auc", direction="max")
TUNERS = {"random": kt.RandomSearch, "bayesian": kt.BayesianOptimization, "hyperband": kt.Hyperband}


@dataclass(frozen=True)
class SearchSpace:
    """Ranges the tuner samples; profiles narrow them to fit their time budget."""

    blocks: tuple[int, int] = (3, 5)  # conv blocks after the stem (min, max)
    filters: tuple[int, ...] = (16, 24, 32)  # first-block widths to choose from
    convs_per_block: tuple[int, int] = (1, 2)  # (min, max)
    dropout: tuple[float, float] = (0.1, 0.5)  # (min, max), step 0.1
    dense_units: tuple[int, ...] = (0, 64, 128)
    learning_rate: tuple[float, float] = (3e-4, 3e-3)  # log-uniform (min, max)
    fixed: dict = field(default_factory=dict)  # other ConvNetConfig fields, e.g. {"stem_stride": 2}


def sample_config(hp: kt.HyperParameters, image_size: int, space: SearchSpace = SearchSpace()) -> ConvNetConfig:
    """Draw one architecture from the search space: blocks, filters, dropout, dense width, learning rate."""
    return ConvNetConfig(
        image_size=image_size,
        blocks=hp.Int("blocks", *space.blocks),
        filters=hp.Choice("filters", list(space.filters)),
        convs_per_block=hp.Int("convs_per_block", *space.convs_per_block),
        dropout=hp.Float("dropout", *space.dropout, step=0.1),
        dense_units=hp.Choice("dense_units", list(space.dense_units)),
        learning_rate=hp.Float("learning_rate", *space.learning_rate, sampling="log"),
        **space.fixed,
    )


def config_from_hparams(values: dict, image_size: int, space: SearchSpace = SearchSpace()) -> ConvNetConfig:
    """Rebuild the ConvNetConfig of a finished trial from its hyperparameter values."""
    hp = kt.HyperParameters()
    for name, value in values.items():
        hp.Fixed(name, value)
    return sample_config(hp, image_size, space)


def completed_trials(trials: Iterable) -> list:
    """The trials that finished with a score (not failed, invalid or still running)."""
    return [t for t in trials if t.status == "COMPLETED" and t.score is not None]


def best_distinct_trials(trials: Iterable, k: int) -> list:
    """The `k` best completed trials by score (highest first), one per architecture.

    Keras-Tuner's own `get_best_trials` pads a short list with failed trials, and hyperband retrains one
    configuration in later rounds as a new trial (its `tuner/...` values differ): neither is a network to train.
    """
    chosen, seen = [], set()
    for trial in sorted(completed_trials(trials), key=lambda t: -t.score):
        key = tuple(sorted((n, v) for n, v in trial.hyperparameters.values.items() if not n.startswith("tuner/")))
        if key not in seen:
            seen.add(key)
            chosen.append(trial)
    return chosen[:k]


class ConvNetHyperModel(kt.HyperModel):
    """Builds `build_convnet(sample_config(hp))` for one fixed input size and search space."""

    def __init__(self, image_size: int, space: SearchSpace = SearchSpace()):
        super().__init__(name="cxr_convnet")
        self.image_size, self.space = image_size, space

    def build(self, hp: kt.HyperParameters):
        return build_convnet(sample_config(hp, self.image_size, self.space))


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
