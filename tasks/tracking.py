"""MLflow plumbing shared by the tasks: the parent run, per-epoch logging, figures and Prefect artifacts."""

from __future__ import annotations

import base64
import io
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import keras
import mlflow
from matplotlib.figure import Figure
from prefect import task
from prefect.cache_policies import NONE

from cxr_model.config import TrainConfig
from cxr_model.errors import CxrError

IO_RETRIES = 3  # tries after the first for tasks that only talk to a server (MLflow, the registry)
# MLflow 3 types each experiment; "custom_model_development" is its "Machine learning" kind (runs, not GenAI traces)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def retry_on_io(task, task_run, state) -> bool:
    """Prefect's `retry_condition_fn`: retry a failure of the server, not a user's mistake (a CxrError), which
    fails the same way every time."""
    try:
        state.result()
    except CxrError:
        return False
    except Exception:
        return True
    return False


@task(name="record-config", cache_policy=NONE, retries=IO_RETRIES, retry_delay_seconds=5,
      retry_condition_fn=retry_on_io)
def record_config(cfg: TrainConfig, run_id: str) -> None:
    """Log every setting as a `cfg/` parameter and the whole typed config as `config.json` (what a search worker
    reads back). Idempotent, so retried when the tracking server fails."""
    settings = cfg.model_dump(mode="json")
    with in_run(run_id):
        mlflow.log_params({f"cfg/{k}": v for k, v in settings.items()})
        mlflow.log_dict(settings, "config.json")


def _flow_run_state(flow_run_id: str) -> str | None:
    """The state type of a Prefect flow run on this flow's API; None where that API does not know it."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(flow_run_id)).state
    except (ObjectNotFound, ValueError):  # another Prefect's run (a local store moved between servers), a bad tag
        return None
    return state.type.value if state is not None else None


def end_running_runs(experiment_id: str, query: str, status: str, tag: tuple[str, str]) -> int:
    """End with `status`, tagged `tag`, every RUNNING run of the experiment that `query` (an MLflow filter) finds; how
    many."""
    client = mlflow.MlflowClient()
    runs = client.search_runs([experiment_id], f"{query} and attributes.status = 'RUNNING'")
    for run in runs:
        client.set_tag(run.info.run_id, *tag)
        client.set_terminated(run.info.run_id, status=status)
    return len(runs)


def _why_dead(run: mlflow.entities.Run, this_flow_run: str | None) -> str | None:
    """Why a RUNNING pipeline run is dead (its `cxr.failure` text), or None while it may be alive.

    Crashed is what Prefect shows for a flow whose process was killed (its heartbeats stopped). An earlier
    attempt of this very flow run (a crashed run retried from the UI keeps its id) is dead too, since this flow
    has not opened its own run yet. Any other state, or a flow run this API does not know (a local run, whose
    killed process Prefect never hears of), may still be running.
    """
    flow_run_id = run.data.tags.get("prefect.flow_run_id")
    if not flow_run_id:
        return None
    name = run.data.tags.get("prefect.flow_run_name", flow_run_id)
    if flow_run_id == this_flow_run:
        return f"an earlier attempt of this flow run ({name}) died"
    return f"its Prefect flow run {name} ended CRASHED" if _flow_run_state(flow_run_id) == "CRASHED" else None


@task(name="close-crashed-runs", cache_policy=NONE)
def close_crashed_runs(experiment_id: str, this_flow_run: str | None) -> list[str]:
    """Mark FAILED every RUNNING pipeline run of the experiment whose Prefect flow run crashed (a killed worker's
    flow), with its RUNNING trials, so that no run shows as running for ever; their ids.

    Best effort: a failure here (a server that refuses) is printed and leaves the runs as they are, never failing
    the flow that is about to train. A crashed flow that was in fact alive ends its run itself later, FINISHED.
    """
    client = mlflow.MlflowClient()
    closed = []
    try:
        runs = client.search_runs([experiment_id], "attributes.status = 'RUNNING' and tags.`cxr.role` = 'pipeline'")
    except Exception as exc:  # any failure of the lookup: nothing is closed
        print(f"Could not look for crashed flows' runs ({type(exc).__name__}: {exc}); none closed")
        return closed
    for run in runs:
        try:
            why = _why_dead(run, this_flow_run)
            if why is None:
                continue
            trials = end_running_runs(experiment_id, f"tags.`mlflow.parentRunId` = '{run.info.run_id}'", "FAILED",
                                      ("cxr.failure", why))
            client.set_tag(run.info.run_id, "cxr.failure", why)
            client.set_terminated(run.info.run_id, status="FAILED")
        except Exception as exc:  # this run stays as it is; the flow goes on
            print(f"Could not close MLflow run {run.info.run_id} ({type(exc).__name__}: {exc})")
            continue
        print(f"Closed MLflow run {run.info.run_id} (and {trials} running trials) as FAILED: {why}")
        closed.append(run.info.run_id)
    return closed


def use_experiment(name: str) -> str:
    """Make `name` the active MLflow experiment, created if new and typed as machine learning; its id.

    MLflow 3 reads the kind from this tag (its UI before the GenAI / Model training switch, its assistant);
    MLflow 3.17's UI takes the view from its address instead (`cxr_pneumonia.ui_link`). A kind a person set is kept.
    """
    experiment = mlflow.set_experiment(name)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


@contextmanager
def in_run(run_id: str) -> Iterator[mlflow.ActiveRun]:
    """Make `run_id` the active MLflow run, reusing it when it already is (tasks run in flow threads)."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield active
        return
    # A task in a worker thread has no active run: attach to the parent without ending it afterwards.
    run = mlflow.start_run(run_id=run_id)
    try:
        yield run
    finally:
        mlflow.end_run(status="RUNNING")


def git_commit() -> str:
    """The checkout's commit, or 'unknown' outside a git work tree (e.g. in the Docker image)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def metric_key(keras_name: str) -> str:
    """Keras history key -> stable MLflow key: 'val_auc' -> 'val/auc', 'loss' -> 'train/loss'."""
    if keras_name.startswith("val_"):
        return "val/" + keras_name[4:]
    return "train/" + keras_name


class MlflowEpochLogger(keras.callbacks.Callback):
    """Log every epoch's metrics to the active MLflow run under train/ and val/ keys, after `prefix` if given."""

    def __init__(self, prefix: str = ""):
        super().__init__()
        self.prefix = prefix

    def on_epoch_end(self, epoch, logs=None):
        metrics = {self.prefix + metric_key(k): float(v) for k, v in (logs or {}).items()}
        if metrics:
            mlflow.log_metrics(metrics, step=epoch)


def figure_png(fig: Figure) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def log_figure(fig: Figure, artifact_file: str) -> bytes:
    """Log a figure as a PNG artifact of the active run; return the PNG bytes (for Prefect artifacts)."""
    png = figure_png(fig)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_bytes(png)
        folder = str(Path(artifact_file).parent)
        mlflow.log_artifact(str(path), artifact_path=None if folder == "." else folder)
    return png


def publish_markdown(key: str, markdown: str, description: str) -> None:
    """A Prefect markdown artifact when running inside a flow; a no-op outside one."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() or TaskRunContext.get():
        create_markdown_artifact(markdown=markdown, key=key, description=description)


def png_markdown(title: str, png: bytes) -> str:
    """An inline (data URI) image for a Prefect markdown artifact."""
    return f"### {title}\n\n![{title}](data:image/png;base64,{base64.b64encode(png).decode()})\n"
