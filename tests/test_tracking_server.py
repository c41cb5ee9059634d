"""The flow against a real `mlflow server` process: every backend from configuration, nothing local-only."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from cxr_model.model_server import start_tracking_server, stop_model_server
from tests.conftest import run_cxr_train


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("tracking-server")
    proc, url = start_tracking_server(root / "store", root / "server.log", timeout=240)
    try:
        yield url, root / "store"
    finally:
        stop_model_server(proc)


@pytest.mark.integration
def test_the_flow_tracks_registers_and_serves_through_a_tracking_server(
        tracking_server: tuple[str, Path], real_subset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow import MlflowClient

    url, store = tracking_server
    client_dir = tmp_path / "client"
    flow = run_cxr_train(client_dir, real_subset, "--model-name", "cxr-remote", tracking_uri=url)
    run_id, version = flow.result["run_id"], flow.result["registered"]["version"]

    client = MlflowClient(url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {"test/roc_auc", "val/auc", "time/train_seconds"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run_id, "val/auc")) >= 2  # per-epoch curves logged over HTTP
    assert client.get_model_version_by_alias("cxr-remote", "champion").version == version
    # artifacts went over HTTP to the server's store, and nothing tracking-related was written beside the client
    artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert "plots/learning_curves.png" in artifacts
    assert any((store / "artifacts").rglob("learning_curves.png"))
    assert not (client_dir / "mlflow.db").exists() and not (client_dir / "mlruns").exists()

    # the registered model loads from the server, as `cxr predict` and `mlflow models serve` would load it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    model = mlflow.pyfunc.load_model("models:/cxr-remote@champion")
    image = next((real_subset / "test" / "NORMAL").glob("*.jpeg")).read_bytes()
    out = model.predict(pd.DataFrame({"image": [base64.b64encode(image).decode("ascii")]}))
    assert out.shape == (1, 3) and 0.0 <= float(out["probability"].iloc[0]) <= 1.0
