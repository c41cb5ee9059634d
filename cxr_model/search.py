"""The Keras-Tuner search: the space, the hypermodel (it only samples hp values), the tuner and its saved state.

Everything here is MLflow- and Prefect-free; the search task adds a nested MLflow run per trial.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl  # POSIX; without it (Windows) the search state is not locked
except ImportError:  # pragma: no cover - not reached on the POSIX machines this runs on
    fcntl = None

import keras
import keras_tuner as kt
import pandas as pd

from cxr_model.cache import DecodedImages
from cxr_model.callbacks import averaged_weights_callbacks
from cxr_model.config import TrainConfig
from cxr_model.data import split_rows
from cxr_model.errors import ConfigError
from cxr_model.model import ConvNetConfig, build_convnet
from cxr_model.pipelines import recipe_datasets

OBJECTIVE = kt.Objective("val_auc", direction="max")
TUNERS = {"random": kt.RandomSearch, "bayesian": kt.BayesianOptimization, "hyperband": kt.Hyperband}


SPACE_FIELDS = ("blocks", "filters", "convs_per_block", "dropout", "dense_units", "learning_rate")


@dataclass(frozen=True)
class SearchSpace:
    """Ranges the tuner samples: TrainConfig's `search_<name>` fields, which document them (profiles narrow them
    to fit their time budget). Build it with `from_config`, or `default_space()` for the fields' defaults."""

    blocks: tuple[int, int]  # (min, max)
    filters: tuple[int, ...]  # choices
    convs_per_block: tuple[int, int]  # (min, max)
    dropout: tuple[float, float]  # (min, max), step 0.1
    dense_units: tuple[int, ...]  # choices
    learning_rate: tuple[float, float]  # log-uniform (min, max)
    fixed: dict = field(default_factory=dict)  # other ConvNetConfig fields, e.g. {"stem_stride": 2}

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> SearchSpace:
        return cls(**cfg.search_space_params())


def default_space() -> SearchSpace:
    """The space of TrainConfig's field defaults, before a profile narrows it."""
    return SearchSpace(**{name: TrainConfig.model_fields[f"search_{name}"].default for name in SPACE_FIELDS})


def sample_config(hp: kt.HyperParameters, image_size: int, space: SearchSpace | None = None) -> ConvNetConfig:
    """Draw one architecture from the search space: blocks, filters, dropout, dense width, learning rate."""
    space = space or default_space()
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


def config_from_hparams(values: dict, image_size: int, space: SearchSpace | None = None) -> ConvNetConfig:
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

    def __init__(self, image_size: int, space: SearchSpace | None = None):
        super().__init__(name="cxr_convnet")
        self.image_size, self.space = image_size, space or default_space()

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


def search_subset(train: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """A label-stratified share of the training split for cheaper trials."""
    if fraction >= 1.0:
        return train
    return train.groupby("label", group_keys=False).sample(frac=fraction, random_state=seed)


@dataclass
class SearchSetup:
    """What every process of one search shares: the trial datasets, the state folder's name, `fit`'s arguments."""

    train: object  # tf.data.Dataset of the (subset of the) training split
    fit: dict  # validation_data, epochs, callbacks, verbose
    project_name: str  # the state folder under the tuner directory


def search_setup(cfg: TrainConfig, manifest: pd.DataFrame, images: DecodedImages, digest: str) -> SearchSetup:
    """The trial datasets and `fit` arguments of a search over `manifest`, the same on a chief and its workers."""
    train = search_subset(split_rows(manifest, "train"), cfg.search_fraction, cfg.seed)
    val = split_rows(manifest, "val")
    plain = cfg.model_copy(update={"mixup": 0.0})  # mixup is the final training's only
    train_ds, val_ds = recipe_datasets(plain, images.take(train), train["label"].to_numpy(), images.take(val),
                                       val["label"].to_numpy())
    # Resuming only makes sense for the same data and the same trial settings: they name the state folder.
    project_name = f"{cfg.tuner}-{digest}-{cfg.image_size}px-{cfg.search_state_key()}"
    fit = dict(validation_data=val_ds, epochs=cfg.search_epochs,  # class weights ride in train_ds
               callbacks=[*averaged_weights_callbacks(bool(cfg.ema)),  # trials judged as runs are
                          keras.callbacks.EarlyStopping("val_auc", mode="max", patience=cfg.patience)],
               verbose=0)
    return SearchSetup(train_ds, fit, project_name)


@contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the search state folder `state_dir` (the file `<state_dir>.lock` beside it).

    Two flows with the same data and trial settings share one state folder: without the lock, one starting over
    (Keras-Tuner's overwrite) would delete the other's trials mid-search, and two resuming would write one oracle
    at once. The second flow waits, saying so, and then starts over or resumes as it was asked. An OS file lock
    (`flock`): it holds across processes on one machine whatever the Prefect server, and it is released when the
    process ends, however it ends.
    """
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        print(f"No file locks on this platform: the search state {state_dir} is not locked against other flows")
        yield
        return
    with open(f"{state_dir}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"Another flow (pid {_holder(handle)}) is searching with the same data and settings in {state_dir}; "
                  "waiting for it to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _holder(handle) -> str:
    """The process id the lock's holder wrote, or '?'."""
    handle.seek(0)
    return handle.read().strip() or "?"


def adopt_tuner_state(state_dir: Path, tuner_id: str) -> None:
    """Let a search resume whichever way it ran before: Keras-Tuner reloads only its own `<tuner id>.json`, which a
    search in one process writes as tuner0 and a distributed chief as chief. Without the file it would start over
    and overwrite the oracle's state."""
    own = state_dir / f"{tuner_id}.json"
    others = sorted(p for p in state_dir.glob("*.json") if p.name != "oracle.json" and p != own)
    if not own.exists() and others:
        shutil.copyfile(others[0], own)


def search_done(oracle) -> bool:
    """A resumed search with every trial already run, completed or failed for good (a chief would otherwise wait
    for workers with nothing to do). Hyperband has no fixed trial count: never done by this test."""
    trials = list(oracle.trials.values())
    return bool(oracle.max_trials) and len(trials) >= oracle.max_trials and all(
        t.status in ("COMPLETED", "FAILED") for t in trials)


def check_same_space(tuner, cfg: TrainConfig, address: str, run_id: str) -> None:
    """ConfigError if the oracle at `address` searches another space than the run's config says."""
    hp = kt.HyperParameters()
    sample_config(hp, cfg.image_size, SearchSpace.from_config(cfg))
    hp = kt.HyperParameters.from_proto(hp.to_proto())  # as the oracle's came over gRPC (which fills in defaults)
    remote = tuner.oracle.get_space()
    ours, theirs = ({h.name: h.get_config() for h in space.space} for space in (hp, remote))
    if ours != theirs:
        raise ConfigError(f"the oracle at {address} searches another space than run {run_id}'s config: is "
                          f"the port another chief's? (oracle: {sorted(theirs)}; run: {sorted(ours)})")
