"""Search task: Keras-Tuner over the convnet, one nested MLflow run per trial, resumable state."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl  # POSIX; without it (Windows) the search state is not locked
except ImportError:  # pragma: no cover - not reached on the POSIX machines this runs on
    fcntl = None

import keras
import mlflow
import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from cxr_model.config import TrainConfig
from cxr_model.search import ConvNetHyperModel, SearchSpace, best_distinct_trials, completed_trials, make_tuner
from cxr_model.train import averaged_weights_callbacks
from tasks.data import DataHandle, fit_datasets, open_data
from tasks.tracking import MlflowEpochLogger, in_run


class MlflowTrials:
    """Tuner mixin: each trial runs inside a nested MLflow run of the flow's parent run."""

    parent_run_id: str = ""

    def run_trial(self, trial, *args, **kwargs):
        tags = {"cxr.role": "trial", "trial_id": str(trial.trial_id)}
        with mlflow.start_run(run_name=f"trial-{trial.trial_id}", nested=True,
                              parent_run_id=self.parent_run_id, tags=tags):
            mlflow.log_params(trial.hyperparameters.values)
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), MlflowEpochLogger()]
            started = time.perf_counter()
            results = super().run_trial(trial, *args, **kwargs)
            seconds = time.perf_counter() - started
            mlflow.log_metric("trial/seconds", seconds)
            print(f"Trial {trial.trial_id} finished in {seconds:.0f} s: {trial.hyperparameters.values}")
            return results


def search_subset(train: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """A label-stratified share of the training split for cheaper trials."""
    if fraction >= 1.0:
        return train
    return train.groupby("label", group_keys=False).sample(frac=fraction, random_state=seed)


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


@task(name="search", cache_policy=NONE)
def search(cfg: TrainConfig, data: DataHandle, run_id: str) -> list[dict]:
    """Run (or resume) the search; return the hyperparameter values of the `cfg.top_trials` best trials, best first.

    Fewer when fewer trials completed (a hyperband search, a resumed search with failed trials).
    """
    keras.utils.set_random_seed(cfg.seed)
    manifest, images = open_data(cfg, data)
    train = search_subset(manifest[manifest["split"] == "train"], cfg.search_fraction, cfg.seed)
    val = manifest[manifest["split"] == "val"]
    train_ds, val_ds = fit_datasets(cfg, images, train, val, mixup=False)  # mixup is the final training's only

    # Resuming only makes sense for the same data and the same trial settings: they name the state folder.
    project_name = f"{cfg.tuner}-{data.digest}-{cfg.image_size}px-{cfg.search_state_key()}"
    state_dir = cfg.tuner_dir / project_name
    with state_lock(state_dir), in_run(run_id):  # one flow at a time per state folder
        if cfg.resume and not state_dir.is_dir():
            print(f"--resume: no search state for these data and settings at {state_dir} "
                  "(a setting that scores trials differently starts a new search); starting a new one")
        space = SearchSpace(**cfg.search_space_params())
        tuner = make_tuner(cfg.tuner, ConvNetHyperModel(cfg.image_size, space), cfg.tuner_dir,
                           project_name=project_name, max_trials=cfg.max_trials, search_epochs=cfg.search_epochs,
                           seed=cfg.seed, resume=cfg.resume, base=MlflowTrials)
        tuner.parent_run_id = run_id
        tuner.search(train_ds, validation_data=val_ds, epochs=cfg.search_epochs,  # class weights ride in train_ds
                     callbacks=[*averaged_weights_callbacks(bool(cfg.ema)),  # trials judged as runs are
                                keras.callbacks.EarlyStopping("val_auc", mode="max", patience=cfg.patience)],
                     verbose=0)
        completed = len(completed_trials(tuner.oracle.trials.values()))
        top = best_distinct_trials(tuner.oracle.trials.values(), cfg.top_trials)
        if not top:
            raise RuntimeError(f"No search trial completed (see the trial tracebacks above); state in {state_dir}")
        best = top[0].hyperparameters.values
        mlflow.log_params({f"best/{k}": v for k, v in best.items()})
        mlflow.log_param("search/top_trial_ids", ",".join(t.trial_id for t in top))  # the networks trained, in order
        mlflow.log_metrics({"search/best_val_auc": float(top[0].score), "search/completed_trials": float(completed)})
    if len(top) < cfg.top_trials:
        print(f"Only {len(top)} completed trials of distinct networks for top_trials={cfg.top_trials}: "
              f"training {len(top)}")
    print(f"Search finished: {completed} trials, best val AUC {top[0].score:.4f}, {best}")
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in t.hyperparameters.values.items()} for t in top]
