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

from cxr_model.cache import decoded_images
from cxr_model.config import DataConfigError, TrainConfig
from cxr_model.distributed import (
    ORACLE_IP,
    ORACLE_PORT,
    PORT_TAG,
    TUNER_ID,
    search_role,
    worker_instructions,
    worker_role,
)
from cxr_model.search import ConvNetHyperModel, SearchSpace, best_distinct_trials, completed_trials, make_tuner
from cxr_model.train import averaged_weights_callbacks, configure_threads
from tasks.data import DataHandle, fit_datasets, index_and_split, open_data
from tasks.tracking import MlflowEpochLogger, in_run


class MlflowTrials:
    """Tuner mixin: each trial runs inside a nested MLflow run of the flow's parent run."""

    parent_run_id: str = ""

    def run_trial(self, trial, *args, **kwargs):
        tags = {"cxr.role": "trial", "trial_id": str(trial.trial_id), "tuner_id": self.tuner_id}
        self.ran_trials = [*getattr(self, "ran_trials", []), str(trial.trial_id)]
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


def _search_setup(cfg: TrainConfig, manifest: pd.DataFrame, images, digest: str):
    """What every process of one search shares: the trial datasets, the state folder's name, the fit arguments."""
    train = search_subset(manifest[manifest["split"] == "train"], cfg.search_fraction, cfg.seed)
    val = manifest[manifest["split"] == "val"]
    train_ds, val_ds = fit_datasets(cfg, images, train, val, mixup=False)  # mixup is the final training's only
    # Resuming only makes sense for the same data and the same trial settings: they name the state folder.
    project_name = f"{cfg.tuner}-{digest}-{cfg.image_size}px-{cfg.search_state_key()}"
    fit = dict(validation_data=val_ds, epochs=cfg.search_epochs,  # class weights ride in train_ds
               callbacks=[*averaged_weights_callbacks(bool(cfg.ema)),  # trials judged as runs are
                          keras.callbacks.EarlyStopping("val_auc", mode="max", patience=cfg.patience)],
               verbose=0)
    return train_ds, fit, project_name


def _tuner(cfg: TrainConfig, directory: Path, project_name: str, resume: bool, parent_run_id: str):
    space = SearchSpace(**cfg.search_space_params())
    tuner = make_tuner(cfg.tuner, ConvNetHyperModel(cfg.image_size, space), directory, project_name=project_name,
                       max_trials=cfg.max_trials, search_epochs=cfg.search_epochs, seed=cfg.seed, resume=resume,
                       base=MlflowTrials)
    tuner.parent_run_id = parent_run_id
    return tuner


def _search_done(oracle) -> bool:
    """A resumed search with every trial already run (a chief would otherwise wait for workers with nothing to
    do). Hyperband has no fixed trial count: never done by this test."""
    trials = list(oracle.trials.values())
    return bool(oracle.max_trials) and len(trials) >= oracle.max_trials and all(
        t.status not in ("RUNNING", "IDLE") for t in trials)


@task(name="search", cache_policy=NONE)
def search(cfg: TrainConfig, data: DataHandle, run_id: str) -> list[dict]:
    """Run (or resume) the search; return the hyperparameter values of the `cfg.top_trials` best trials, best first.

    Fewer when fewer trials completed (a hyperband search, a resumed search with failed trials). As the chief of
    a distributed search (`cxr_model.distributed`) it serves the oracle until workers have run every trial.
    """
    role = search_role()
    if role is not None and role.role == "worker":
        raise DataConfigError(f"{TUNER_ID}={role.tuner_id} makes this process a search worker: the flow runs on the "
                              f"chief ({TUNER_ID}=chief) or without the {TUNER_ID}/{ORACLE_IP}/{ORACLE_PORT} "
                              "settings; a worker runs `cxr search-worker`")
    keras.utils.set_random_seed(cfg.seed)
    manifest, images = open_data(cfg, data)
    train_ds, fit, project_name = _search_setup(cfg, manifest, images, data.digest)
    state_dir = cfg.tuner_dir / project_name
    with state_lock(state_dir), in_run(run_id):  # one flow at a time per state folder
        if cfg.resume and not state_dir.is_dir():
            print(f"--resume: no search state for these data and settings at {state_dir} "
                  "(a setting that scores trials differently starts a new search); starting a new one")
        tuner = _tuner(cfg, cfg.tuner_dir, project_name, cfg.resume, run_id)
        if role is not None and _search_done(tuner.oracle):
            print(f"Search chief: the resumed search in {state_dir} has run all its trials; not serving")
        else:
            if role is not None:
                mlflow.set_tags({PORT_TAG: str(role.port), "cxr.search_oracle": role.address})
                print(worker_instructions(role, run_id))
            tuner.search(train_ds, **fit)  # on the chief: serves the oracle until the workers are done
        completed = len(completed_trials(tuner.oracle.trials.values()))
        top = best_distinct_trials(tuner.oracle.trials.values(), cfg.top_trials)
        if not top:
            raise RuntimeError(f"No search trial completed (see the trial tracebacks above); state in {state_dir}")
        best = top[0].hyperparameters.values
        mlflow.log_params({f"best/{k}": v for k, v in best.items()})
        mlflow.log_param("search/top_trial_ids", ",".join(t.trial_id for t in top))  # the networks trained, in order
        mlflow.log_metrics({"search/best_val_auc": float(top[0].score), "search/completed_trials": float(completed)})
        if role is not None:  # no longer serving: a worker started now must not join this run
            mlflow.MlflowClient().delete_tag(run_id, PORT_TAG)
    if len(top) < cfg.top_trials:
        print(f"Only {len(top)} completed trials of distinct networks for top_trials={cfg.top_trials}: "
              f"training {len(top)}")
    print(f"Search finished: {completed} trials, best val AUC {top[0].score:.4f}, {best}")
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in t.hyperparameters.values.items()} for t in top]


def find_chief_run(port: int, wait_s: float, poll_s: float = 5.0) -> str:
    """The id of the running flow whose search serves on `port` (the newest if several), waiting up to `wait_s`."""
    client = mlflow.MlflowClient()
    deadline = time.monotonic() + wait_s
    while True:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiment_ids, f"tags.`{PORT_TAG}` = '{port}' and attributes.status = 'RUNNING'",
                                  order_by=["attributes.start_time DESC"], max_results=5) if experiment_ids else []
        if runs:
            if len(runs) > 1:
                print(f"{len(runs)} running flows say they serve a search on port {port} (a chief that crashed "
                      f"leaves its run RUNNING): joining the newest, {runs[0].info.run_id}; --run-id picks one")
            return runs[0].info.run_id
        if time.monotonic() >= deadline:
            raise DataConfigError(f"no running `cxr train` serves a search on port {port} in the tracking store "
                                  f"{mlflow.get_tracking_uri()} (waited {wait_s:.0f} s): start the chief first, "
                                  "with the same MLFLOW_TRACKING_URI, or name its run with --run-id")
        time.sleep(poll_s)


def search_worker(data_dir: Path | None = None, work_dir: Path | None = None, threads: int | None = None,
                  run_id: str | None = None, wait_s: float = 600.0) -> dict:
    """Run trials for a distributed search's chief until it has no more; return what this worker ran.

    The settings come from the chief's run (its `config.json`), so a worker cannot score trials with other
    settings; only the paths (`data_dir`, `work_dir`) and the thread count are this machine's. The worker rebuilds
    the manifest from its own copy of the data and refuses to start if its digest is not the chief's. Each trial
    is a nested MLflow run of the chief's run, tagged with the worker's tuner id.
    """
    role = worker_role()
    configure_threads(threads)
    run_id = run_id or find_chief_run(role.port, wait_s)
    client = mlflow.MlflowClient()
    chief = client.get_run(run_id)
    if chief.info.status != "RUNNING":
        raise DataConfigError(f"run {run_id} is {chief.info.status}, not a search in progress")
    settings = mlflow.artifacts.load_dict(f"{chief.info.artifact_uri.rstrip('/')}/config.json")
    settings.update(data_dir=data_dir, threads=threads)
    if work_dir is not None:
        settings["work_dir"] = work_dir
    else:
        settings.pop("work_dir")  # this machine's CXR_WORK_DIR (or ./work)
    cfg = TrainConfig.model_validate(settings)
    _, manifest, digest = index_and_split(cfg)
    expected = chief.data.tags.get("data_digest")
    if digest != expected:
        raise DataConfigError(f"the data at {cfg.resolved_data_dir()} give manifest digest {digest}, the chief's run "
                              f"{run_id} has {expected}: a worker must see the same files, labels and split")
    print(f"Search worker {role.tuner_id}: run {run_id}, oracle {role.address}, data digest {digest}")
    keras.utils.set_random_seed(cfg.seed)
    images = decoded_images(manifest, cfg.image_size, cfg.cache_dir)
    train_ds, fit, project_name = _search_setup(cfg, manifest, images, digest)
    mlflow.set_experiment(experiment_id=chief.info.experiment_id)
    # its own state folder: a worker's trials (checkpoints) are its own, and starting over must not delete the
    # chief's oracle state when both share a work folder
    tuner = _tuner(cfg, cfg.tuner_dir / "workers" / role.tuner_id, project_name, False, run_id)
    started = time.perf_counter()
    tuner.search(train_ds, **fit)
    ran = sorted(getattr(tuner, "ran_trials", []))
    print(f"Search worker {role.tuner_id}: the chief has no more trials; ran {len(ran)} "
          f"({', '.join(ran) or 'none'}) in {time.perf_counter() - started:.0f} s")
    return {"run_id": run_id, "tuner_id": role.tuner_id, "trials": ran}
