"""Search task: Keras-Tuner over the convnet, one nested MLflow run per trial, resumable state."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl  # POSIX; without it (Windows) the search state is not locked
except ImportError:  # pragma: no cover - not reached on the POSIX machines this runs on
    fcntl = None

import grpc
import keras
import keras_tuner as kt
import mlflow
import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from cxr_model.cache import decoded_images
from cxr_model.config import DataConfigError, TrainConfig
from cxr_model.distributed import (
    PORT_TAG,
    TUNER_ID,
    SearchRole,
    check_can_serve,
    check_tuner,
    flow_role,
    worker_instructions,
    worker_role,
)
from cxr_model.distributed_faults import BEATS_PER_TIMEOUT, Heartbeat, LostTrial, serve_search, watch_worker_client
from cxr_model.search import (
    ConvNetHyperModel,
    SearchSpace,
    best_distinct_trials,
    completed_trials,
    make_tuner,
    sample_config,
)
from cxr_model.train import averaged_weights_callbacks, configure_threads
from tasks.data import DataHandle, fit_datasets, index_and_split, open_data
from tasks.tracking import MlflowEpochLogger, in_run


class MlflowTrials:
    """Tuner mixin: each trial runs inside a nested MLflow run of the flow's parent run."""

    parent_run_id: str = ""

    def run_trial(self, trial, *args, **kwargs):
        tags = {"cxr.role": "trial", "trial_id": str(trial.trial_id), "tuner_id": self.tuner_id}
        self.ran_trials = [*getattr(self, "ran_trials", []), str(trial.trial_id)]
        _retire_unfinished_runs(self.parent_run_id, str(trial.trial_id))
        with mlflow.start_run(run_name=f"trial-{trial.trial_id}", nested=True,
                              parent_run_id=self.parent_run_id, tags=tags):
            mlflow.log_params({**trial.hyperparameters.values, "trial/image_size": self.hypermodel.image_size})
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), MlflowEpochLogger()]
            started = time.perf_counter()
            results = super().run_trial(trial, *args, **kwargs)
            seconds = time.perf_counter() - started
            mlflow.log_metric("trial/seconds", seconds)
            print(f"Trial {trial.trial_id} finished in {seconds:.0f} s: {trial.hyperparameters.values}")
            return results


def _retire_unfinished_runs(parent_run_id: str, trial_id: str) -> None:
    """Mark KILLED an earlier run of this trial that never finished: a worker that died mid-trial, whose trial
    Keras-Tuner hands again to the restarted worker. One finished run per trial stays the rule."""
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    stale = client.search_runs([parent.info.experiment_id],
                               f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.trial_id = '{trial_id}' "
                               "and attributes.status = 'RUNNING'")
    for run in stale:
        client.set_tag(run.info.run_id, "cxr.superseded", "its trial was run again (the process running it stopped)")
        client.set_terminated(run.info.run_id, status="KILLED")


def _fail_lost_trial_run(parent_run_id: str, lost: LostTrial) -> None:
    """Mark FAILED the run of a trial whose worker the chief dropped (it cannot end the run itself)."""
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.trial_id = '{lost.trial_id}' "
                              f"and tags.tuner_id = '{lost.tuner_id}' and attributes.status = 'RUNNING'")
    for run in runs:
        client.set_tag(run.info.run_id, "cxr.failure", lost.reason)
        client.set_terminated(run.info.run_id, status="FAILED")


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


def _adopt_tuner_state(state_dir: Path, tuner_id: str) -> None:
    """Let a search resume whichever way it ran before: Keras-Tuner reloads only its own `<tuner id>.json`, which a
    search in one process writes as tuner0 and a distributed chief as chief. Without the file it would start over
    and overwrite the oracle's state."""
    own = state_dir / f"{tuner_id}.json"
    others = sorted(p for p in state_dir.glob("*.json") if p.name != "oracle.json" and p != own)
    if not own.exists() and others:
        shutil.copyfile(others[0], own)


def _search_done(oracle) -> bool:
    """A resumed search with every trial already run, completed or failed for good (a chief would otherwise wait
    for workers with nothing to do). Hyperband has no fixed trial count: never done by this test."""
    trials = list(oracle.trials.values())
    return bool(oracle.max_trials) and len(trials) >= oracle.max_trials and all(
        t.status in ("COMPLETED", "FAILED") for t in trials)


@task(name="search", cache_policy=NONE)
def search(cfg: TrainConfig, data: DataHandle, run_id: str) -> list[dict]:
    """Run (or resume) the search; return the hyperparameter values of the `cfg.top_trials` best trials, best first.

    Fewer when fewer trials completed (a hyperband search, a resumed search with failed trials). As the chief of
    a distributed search (`cxr_model.distributed`) it serves the oracle until workers have run every trial.
    """
    role = flow_role(cfg.tuner)
    keras.utils.set_random_seed(cfg.seed)
    manifest, images = open_data(cfg, data)
    train_ds, fit, project_name = _search_setup(cfg, manifest, images, data.digest)
    state_dir = cfg.tuner_dir / project_name
    serving = False
    with state_lock(state_dir), in_run(run_id):  # one flow at a time per state folder
        if cfg.resume and not state_dir.is_dir():
            print(f"--resume: no search state for these data and settings at {state_dir} "
                  "(a setting that scores trials differently starts a new search); starting a new one")
        if cfg.resume:
            _adopt_tuner_state(state_dir, role.tuner_id if role is not None else "tuner0")
        tuner = _tuner(cfg, cfg.tuner_dir, project_name, cfg.resume, run_id)
        if role is not None and _search_done(tuner.oracle):
            print(f"Search chief: the resumed search in {state_dir} has run all its trials; not serving")
        else:
            if role is not None:
                check_can_serve(role)  # again: another chief may have taken the port since the CLI checked
                mlflow.set_tags({PORT_TAG: str(role.port), "cxr.search_oracle": role.address})
                serving = True
                print(worker_instructions(role, run_id))
            if serving:  # until the workers are done; a dead worker's trial goes to another one
                serve_search(tuner, role.address, cfg.search_worker_timeout, fit["verbose"],
                             on_trial_lost=lambda lost: _fail_lost_trial_run(run_id, lost))
            else:
                tuner.search(train_ds, **fit)
            if serving:
                # Keras-Tuner saves the oracle before it drops an ended trial from the running ones, and only a
                # trial's end saves it on a chief: without this the last trial would run again on --resume
                tuner.oracle.save()
        completed = len(completed_trials(tuner.oracle.trials.values()))
        top = best_distinct_trials(tuner.oracle.trials.values(), cfg.top_trials)
        if not top:
            raise RuntimeError(f"No search trial completed (see the trial tracebacks above); state in {state_dir}")
        best = top[0].hyperparameters.values
        mlflow.log_params({f"best/{k}": v for k, v in best.items()})
        mlflow.log_param("search/top_trial_ids", ",".join(t.trial_id for t in top))  # the networks trained, in order
        mlflow.log_metrics({"search/best_val_auc": float(top[0].score), "search/completed_trials": float(completed)})
        if serving:  # no longer serving: a worker started now must not join this run
            mlflow.MlflowClient().delete_tag(run_id, PORT_TAG)
    if len(top) < cfg.top_trials:
        print(f"Only {len(top)} completed trials of distinct networks for top_trials={cfg.top_trials}: "
              f"training {len(top)}")
    print(f"Search finished: {completed} trials, best val AUC {top[0].score:.4f}, {best}")
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in t.hyperparameters.values.items()} for t in top]


def wait_for_oracle(role: SearchRole, wait_s: float) -> None:
    """Return once the chief's oracle accepts a connection; DataConfigError after `wait_s` without one."""
    channel = grpc.insecure_channel(role.address)
    try:
        grpc.channel_ready_future(channel).result(timeout=wait_s)
    except grpc.FutureTimeoutError:
        raise DataConfigError(f"no search chief answers at {role.address} (waited {wait_s:.0f} s): start "
                              f"`cxr train` with {TUNER_ID}=chief there first") from None
    finally:
        channel.close()


def find_chief_run(port: int, wait_s: float = 0.0, poll_s: float = 5.0) -> str:
    """The id of the one running flow whose search serves on `port`, waiting up to `wait_s` for it.

    Called once the oracle answers, when the chief's tag is already set. More than one candidate (a chief that
    crashed leaves its run RUNNING with the tag; another host's chief may use the same port) is refused: joining
    the wrong one would log this worker's trials under another run.
    """
    client = mlflow.MlflowClient()
    deadline = time.monotonic() + wait_s
    while True:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiment_ids, f"tags.`{PORT_TAG}` = '{port}' and attributes.status = 'RUNNING'",
                                  order_by=["attributes.start_time DESC"]) if experiment_ids else []
        if len(runs) == 1:
            return runs[0].info.run_id
        if len(runs) > 1:
            listed = ", ".join(f"{r.info.run_id} ({r.info.run_name})" for r in runs)
            raise DataConfigError(f"{len(runs)} running flows say they serve a search on port {port}: {listed}. A "
                                  "chief that crashed leaves its run RUNNING: name the live one with --run-id (and "
                                  "mark the others failed in MLflow)")
        if time.monotonic() >= deadline:
            raise DataConfigError(f"no running `cxr train` serves a search on port {port} in the tracking store "
                                  f"{mlflow.get_tracking_uri()}: the chief must log to the same MLFLOW_TRACKING_URI, "
                                  "or name its run with --run-id")
        time.sleep(poll_s)


def _check_same_space(tuner, cfg: TrainConfig, run_id: str, role: SearchRole) -> None:
    """DataConfigError if the oracle on the port searches another space than the run's config says."""
    hp = kt.HyperParameters()
    sample_config(hp, cfg.image_size, SearchSpace(**cfg.search_space_params()))
    hp = kt.HyperParameters.from_proto(hp.to_proto())  # as the oracle's came over gRPC (which fills in defaults)
    remote = tuner.oracle.get_space()
    ours, theirs = ({h.name: h.get_config() for h in space.space} for space in (hp, remote))
    if ours != theirs:
        raise DataConfigError(f"the oracle at {role.address} searches another space than run {run_id}'s config: is "
                              f"the port another chief's? (oracle: {sorted(theirs)}; run: {sorted(ours)})")


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
    started = time.monotonic()
    wait_for_oracle(role, wait_s)
    run_id = run_id or find_chief_run(role.port, max(0.0, wait_s - (time.monotonic() - started)))
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
    check_tuner(role, cfg.tuner)
    _, manifest, digest = index_and_split(cfg)
    expected = chief.data.tags.get("data_digest")
    if digest != expected:
        raise DataConfigError(f"the data at {cfg.resolved_data_dir()} give manifest digest {digest}, the chief's run "
                              f"{run_id} has {expected}: a worker must see the same files, labels and split")
    print(f"Search worker {role.tuner_id}: run {run_id}, oracle {role.address}, data digest {digest}")
    # from here the chief counts this worker live; it drops one silent for cfg.search_worker_timeout seconds
    beats = Heartbeat(role.address, role.tuner_id, cfg.search_worker_timeout / BEATS_PER_TIMEOUT).start()
    keras.utils.set_random_seed(cfg.seed)
    images = decoded_images(manifest, cfg.image_size, cfg.cache_dir)
    train_ds, fit, project_name = _search_setup(cfg, manifest, images, digest)
    mlflow.set_experiment(experiment_id=chief.info.experiment_id)
    # its own state folder: a worker's trials (checkpoints) are its own, and starting over must not delete the
    # chief's oracle state when both share a work folder
    tuner = _tuner(cfg, cfg.tuner_dir / "workers" / role.tuner_id, project_name, False, run_id)
    _check_same_space(tuner, cfg, run_id, role)
    watch_worker_client(tuner.oracle, role.address)  # paced IDLE answers; failed trials' errors to the chief
    started = time.perf_counter()
    try:
        tuner.search(train_ds, **fit)
    finally:
        beats.stop()
    ran = sorted(getattr(tuner, "ran_trials", []))
    print(f"Search worker {role.tuner_id}: the chief has no more trials; ran {len(ran)} "
          f"({', '.join(ran) or 'none'}) in {time.perf_counter() - started:.0f} s")
    return {"run_id": run_id, "tuner_id": role.tuner_id, "trials": ran}
