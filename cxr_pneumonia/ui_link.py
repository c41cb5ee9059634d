"""The MLflow UI's address for an experiment's training runs, and `make ui`'s line that prints it.

MLflow 3's UI shows an experiment as a GenAI app (its overview page, no runs) unless the address asks for the
machine-learning view: `#/experiments/<id>/runs?workflowType=machine_learning` opens the runs table, and the UI
keeps the setting on the pages linked from there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LOCAL_UI = "http://127.0.0.1:5000"  # where `make ui` serves it
EXPERIMENT = "cxr-pneumonia"  # TrainConfig.experiment_name's default


def runs_view_url(base: str, experiment_id: str) -> str:
    """The runs table of one experiment in the MLflow UI at `base`."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_base(tracking_uri: str) -> str:
    """Where the UI for a tracking store is: a tracking server serves its own; a local store, `make ui`'s."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else LOCAL_UI


def _local_store_missing(tracking_uri: str) -> bool:
    """True for a SQLite store whose file does not exist (opening it would create an empty one)."""
    return tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file()


def runs_line(tracking_uri: str, experiment: str = EXPERIMENT) -> str:
    """One line: the address of the experiment's runs, or why there is none yet."""
    base = ui_base(tracking_uri)
    if _local_store_missing(tracking_uri):
        return f"no runs in {tracking_uri} yet (`make train` writes them); the UI opens at {base}"
    from mlflow import MlflowClient

    found = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    if found is None:
        return f"no experiment {experiment!r} in {tracking_uri} yet; the UI opens at {base}"
    return f"training runs: {runs_view_url(base, found.experiment_id)}"


def main(argv: list[str] | None = None) -> int:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    experiment = (argv if argv is not None else sys.argv[1:]) or [EXPERIMENT]
    print(runs_line(uri, experiment[0]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
