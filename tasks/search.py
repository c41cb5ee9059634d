"""Search tasks: Keras-Tuner over the convnet (`cxr_model.search`), one nested MLflow run per trial.

`search` runs in the training flow (in one process, or as a distributed search's chief); `join_search` and
`run_worker_trials` are a search worker's (flows/search_worker_flow.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import keras
import mlflow
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel

from cxr_model.cache import decoded_images
from cxr_model.config import TrainConfig
from cxr_model.data import index_and_split
from cxr_model.distributed import (
    PORT_TAG,
    check_can_serve,
    check_tuner,
    flow_role,
    wait_for_oracle,
    worker_instructions,
    worker_role,
)
from cxr_model.distributed_faults import BEATS_PER_TIMEOUT, Heartbeat, LostTrial, serve_search, watch_worker_client
from cxr_model.errors import ConfigError, DataError
from cxr_model.runtime import configure_threads
from cxr_model.search import (
    ConvNetHyperModel,
    SearchSpace,
    adopt_tuner_state,
    best_distinct_trials,
    check_same_space,
    completed_trials,
    make_tuner,
    search_done,
    search_setup,
    state_lock,
)
from cxr_pneumonia.tasks.data import DataHandle, open_data
from cxr_pneumonia.tasks.tracking import IO_RETRIES, MlflowEpochLogger, end_running_runs, in_run, retry_on_io


class MlflowTrials:
    """Tuner mixin: each trial runs inside a nested MLflow run of the flow's parent run."""

    parent_run_id: str = ""

    def run_trial(self, trial, *args, **kwargs):
        tags = {"cxr.role": "trial", "trial_id": str(trial.trial_id), "tuner_id": self.tuner_id}
        self.ran_trials = [*getattr(self, "ran_trials", []), str(trial.trial_id)]
        retire_unfinished_runs(self.parent_run_id, str(trial.trial_id))
        print(f"Trial {trial.trial_id} started: {trial.hyperparameters.values}")
        with mlflow.start_run(run_name=f"trial-{trial.trial_id}", nested=True,
                              parent_run_id=self.parent_run_id, tags=tags):
            mlflow.log_params({**trial.hyperparameters.values, "trial/image_size": self.hypermodel.image_size})
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), MlflowEpochLogger()]
            started = time.perf_counter()
            results = super().run_trial(trial, *args, **kwargs)
            seconds = time.perf_counter() - started
            mlflow.log_metric("trial/seconds", seconds)
            print(f"Trial {trial.trial_id} finished in {seconds:.0f} s")
            return results


def end_running_trial_runs(parent_run_id: str, trial_id: str, status: str, tag: tuple[str, str],
                           tuner_id: str | None = None) -> None:
    """End with `status` (and tag with `tag`) every RUNNING nested run of one trial, of one worker if `tuner_id`."""
    parent = mlflow.MlflowClient().get_run(parent_run_id)
    worker = f" and tags.tuner_id = '{tuner_id}'" if tuner_id is not None else ""
    end_running_runs(parent.info.experiment_id,
                     f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.trial_id = '{trial_id}'{worker}", status,
                     tag)


def retire_unfinished_runs(parent_run_id: str, trial_id: str) -> None:
    """Mark KILLED an earlier run of this trial that never finished: a worker that died mid-trial, whose trial
    Keras-Tuner hands again to the restarted worker. One finished run per trial stays the rule."""
    end_running_trial_runs(parent_run_id, trial_id, "KILLED",
                           ("cxr.superseded", "its trial was run again (the process running it stopped)"))


def fail_lost_trial_run(parent_run_id: str, lost: LostTrial) -> None:
    """Mark FAILED the run of a trial whose worker the chief dropped (it cannot end the run itself)."""
    end_running_trial_runs(parent_run_id, lost.trial_id, "FAILED", ("cxr.failure", lost.reason), lost.tuner_id)


def _tuner(cfg: TrainConfig, directory: Path, project_name: str, resume: bool, parent_run_id: str):
    tuner = make_tuner(cfg.tuner, ConvNetHyperModel(cfg.image_size, SearchSpace.from_config(cfg)), directory,
                       project_name=project_name, max_trials=cfg.max_trials, search_epochs=cfg.search_epochs,
                       seed=cfg.seed, resume=resume, base=MlflowTrials)
    tuner.parent_run_id = parent_run_id
    return tuner


@task(name="search", cache_policy=NONE)
def search(cfg: TrainConfig, data: DataHandle, run_id: str) -> list[dict]:
    """Run (or resume) the search; return the hyperparameter values of the `cfg.top_trials` best trials, best first.

    Fewer when fewer trials completed (a hyperband search, a resumed search with failed trials). As the chief of
    a distributed search (`cxr_model.distributed`) it serves the oracle until workers have run every trial.
    """
    role = flow_role(cfg.tuner)
    keras.utils.set_random_seed(cfg.seed)
    manifest, images = open_data(cfg, data)
    setup = search_setup(cfg, manifest, images, data.digest)
    state_dir = cfg.tuner_dir / setup.project_name
    serving = False
    with state_lock(state_dir), in_run(run_id):  # one flow at a time per state folder
        if cfg.resume and not state_dir.is_dir():
            print(f"--resume: no search state for these data and settings at {state_dir} "
                  "(a setting that scores trials differently starts a new search); starting a new one")
        if cfg.resume:
            adopt_tuner_state(state_dir, role.tuner_id if role is not None else "tuner0")
        tuner = _tuner(cfg, cfg.tuner_dir, setup.project_name, cfg.resume, run_id)
        if role is not None and search_done(tuner.oracle):
            print(f"Search chief: the resumed search in {state_dir} has run all its trials; not serving")
        else:
            if role is not None:
                check_can_serve(role)  # again: another chief may have taken the port since the CLI checked
                mlflow.set_tags({PORT_TAG: str(role.port), "cxr.search_oracle": role.address})
                serving = True
                print(worker_instructions(role, run_id))
            if serving:  # until the workers are done; a dead worker's trial goes to another one
                serve_search(tuner, role.address, cfg.search_worker_timeout, setup.fit["verbose"],
                             on_trial_lost=lambda lost: fail_lost_trial_run(run_id, lost))
            else:
                tuner.search(setup.train, **setup.fit)
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
            raise ConfigError(f"{len(runs)} running flows say they serve a search on port {port}: {listed}. A "
                              "chief that crashed leaves its run RUNNING: name the live one with --run-id (and "
                              "mark the others failed in MLflow)")
        if time.monotonic() >= deadline:
            raise ConfigError(f"no running `cxr train` serves a search on port {port} in the tracking store "
                              f"{mlflow.get_tracking_uri()}: the chief must log to the same MLFLOW_TRACKING_URI, "
                              "or name its run with --run-id")
        time.sleep(poll_s)


class ChiefRun(BaseModel):
    """The search a worker joins: the chief's run, its experiment and its config as this machine runs it."""

    run_id: str
    experiment_id: str
    cfg: TrainConfig
    data_digest: str


@task(name="join-search", cache_policy=NONE, retries=IO_RETRIES, retry_delay_seconds=5, retry_condition_fn=retry_on_io)
def join_search(data_dir: Path | None, work_dir: Path | None, threads: int | None, run_id: str | None,
                wait_s: float) -> ChiefRun:
    """Find the chief's run and read its config; only the paths and the thread count are this machine's.

    Retried on a server's failure only: it only reads (the oracle's port, the tracking server), and a server that
    restarts answers again; a refusal (a finished run, a silent oracle after `wait_s`) fails at once.
    """
    role = worker_role()
    started = time.monotonic()
    wait_for_oracle(role, wait_s)
    run_id = run_id or find_chief_run(role.port, max(0.0, wait_s - (time.monotonic() - started)))
    chief = mlflow.MlflowClient().get_run(run_id)
    if chief.info.status != "RUNNING":
        raise ConfigError(f"run {run_id} is {chief.info.status}, not a search in progress")
    settings = mlflow.artifacts.load_dict(f"{chief.info.artifact_uri.rstrip('/')}/config.json")
    settings.update(data_dir=data_dir, threads=threads)
    if work_dir is not None:
        settings["work_dir"] = work_dir
    else:
        settings.pop("work_dir")  # this machine's CXR_WORK_DIR (or ./work)
    cfg = TrainConfig.model_validate(settings)
    check_tuner(role, cfg.tuner)
    return ChiefRun(run_id=run_id, experiment_id=chief.info.experiment_id, cfg=cfg,
                    data_digest=chief.data.tags.get("data_digest", ""))


@task(name="worker-trials", cache_policy=NONE)
def run_worker_trials(chief: ChiefRun) -> dict:
    """Run trials for the chief until it has no more; return what this worker ran.

    The worker rebuilds the manifest from its own copy of the data and refuses to start if its digest is not the
    chief's. Each trial is a nested MLflow run of the chief's run, tagged with the worker's tuner id.
    """
    role, cfg = worker_role(), chief.cfg
    configure_threads(cfg.threads)
    _, manifest, digest = index_and_split(cfg)
    if digest != chief.data_digest:
        raise DataError(f"the data at {cfg.resolved_data_dir()} give manifest digest {digest}, the chief's run "
                        f"{chief.run_id} has {chief.data_digest}: a worker must see the same files, labels and split")
    print(f"Search worker {role.tuner_id}: run {chief.run_id}, oracle {role.address}, data digest {digest}")
    # from here the chief counts this worker live; it drops one silent for cfg.search_worker_timeout seconds
    beats = Heartbeat(role.address, role.tuner_id, cfg.search_worker_timeout / BEATS_PER_TIMEOUT).start()
    keras.utils.set_random_seed(cfg.seed)
    images = decoded_images(manifest, cfg.image_size, cfg.cache_dir)
    setup = search_setup(cfg, manifest, images, digest)
    mlflow.set_experiment(experiment_id=chief.experiment_id)
    # its own state folder: a worker's trials (checkpoints) are its own, and starting over must not delete the
    # chief's oracle state when both share a work folder
    tuner = _tuner(cfg, cfg.tuner_dir / "workers" / role.tuner_id, setup.project_name, False, chief.run_id)
    check_same_space(tuner, cfg, role.address, chief.run_id)
    watch_worker_client(tuner.oracle, role.address)  # paced IDLE answers; failed trials' errors to the chief
    started = time.perf_counter()
    try:
        tuner.search(setup.train, **setup.fit)
    finally:
        beats.stop()
    ran = sorted(getattr(tuner, "ran_trials", []))
    print(f"Search worker {role.tuner_id}: the chief has no more trials; ran {len(ran)} "
          f"({', '.join(ran) or 'none'}) in {time.perf_counter() - started:.0f} s")
    return {"run_id": chief.run_id, "tuner_id": role.tuner_id, "trials": ran}
