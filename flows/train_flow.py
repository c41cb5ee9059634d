"""The training flow: load -> visualize -> search -> train -> evaluate -> register, in one MLflow run."""

from __future__ import annotations

import time

import mlflow
from prefect import flow, runtime

from cxr_model.config import TrainConfig
from cxr_model.runtime import configure_threads
from cxr_pneumonia.tasks.data import load_data
from cxr_pneumonia.tasks.evaluate import evaluate
from cxr_pneumonia.tasks.register import register
from cxr_pneumonia.tasks.search import search
from cxr_pneumonia.tasks.tracking import close_crashed_runs, git_commit, record_config, use_experiment
from cxr_pneumonia.tasks.training import train_model
from cxr_pneumonia.tasks.visualize import visualize


def prefect_tags() -> dict[str, str]:
    """The Prefect flow run (and deployment, if any) behind this MLflow run, so each UI leads to the other.

    The deployment's name costs one API call; a failing one costs only that tag, never the run.
    """
    found = {"prefect.flow_run_id": runtime.flow_run.id, "prefect.flow_run_name": runtime.flow_run.name}
    if found["prefect.flow_run_id"]:
        try:
            found["prefect.deployment"] = runtime.deployment.name
        except Exception as exc:  # any failure of the lookup (no API, a timeout)
            print(f"Could not read the Prefect deployment's name ({type(exc).__name__}); not tagged")
    return {k: str(v) for k, v in found.items() if v}


@flow(name="cxr-pneumonia-train", log_prints=True)
def train_flow(cfg: TrainConfig) -> dict:
    """Run the whole workflow for one config; returns the run id, test metrics and the registered version.

    Each stage's wall time is logged as `time/<stage>_seconds` and returned under "seconds".
    """
    configure_threads(cfg.threads)  # in the flow, so the CLI and a deployment or worker that calls it get them alike
    experiment_id = use_experiment(cfg.experiment_name)
    tags = {"profile": cfg.profile, "git_commit": git_commit(), "cxr.role": "pipeline", **prefect_tags()}
    close_crashed_runs(experiment_id, tags.get("prefect.flow_run_id"))  # a killed worker's flow left its run open
    seconds: dict[str, float] = {}

    def timed(stage: str, task, *args):
        started = time.perf_counter()
        print(f"[{stage}] started")
        out = task(*args)
        seconds[stage] = time.perf_counter() - started
        print(f"[{stage}] done in {seconds[stage]:.0f} s")
        return out

    with mlflow.start_run(run_name=f"{cfg.profile}-{cfg.tuner}", tags=tags) as run:
        run_id = run.info.run_id
        record_config(cfg, run_id)
        data = timed("load", load_data, cfg, run_id)
        timed("visualize", visualize, cfg, data, run_id)
        top_hparams = timed("search", search, cfg, data, run_id)  # the best cfg.top_trials trials, best first
        trained = timed("train", train_model, cfg, data, top_hparams, run_id)
        evaluation = timed("evaluate", evaluate, cfg, data, trained, run_id)
        registration = timed("register", register, cfg, data, trained, evaluation, run_id)
        mlflow.log_metrics({f"time/{stage}_seconds": s for stage, s in seconds.items()})
    return {"run_id": run_id, "test": evaluation.test, "threshold": evaluation.threshold,
            "registered": registration.model_dump(), "seconds": seconds}
