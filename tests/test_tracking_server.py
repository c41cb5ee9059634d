"""The flow against a real `mlflow server` process on PostgreSQL: every backend from configuration, nothing
local-only."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psycopg
import pytest

from cxr_model.distributed import PORT_TAG
from cxr_pneumonia.model_server import free_port, start_tracking_server, stop_model_server
from tests.conftest import run_cxr_train, start_cxr_train


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL 16 server (the `pgserver` wheel: no system package), on a Unix socket; yields the URI of
    an empty database for MLflow."""
    try:
        import pgserver
    except ImportError:  # no wheel for this platform (pyproject.toml): skip, except in CI, where it is installed
        if os.environ.get("CI"):
            raise
        pytest.skip("pgserver (a PostgreSQL server in a wheel) has no build for this platform")
    server = pgserver.get_server(tmp_path_factory.mktemp("postgres"), cleanup_mode="stop")
    try:
        server.psql("CREATE DATABASE mlflow;")
        yield server.get_uri("mlflow")
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory, postgres: str) -> Iterator[tuple[str, Path]]:
    """`mlflow server` as a team runs it: runs and registry on PostgreSQL, artifacts proxied over HTTP."""
    root = tmp_path_factory.mktemp("tracking-server")
    proc, url = start_tracking_server(root / "store", root / "server.log", timeout=240, backend_store_uri=postgres)
    try:
        yield url, root / "store"
    finally:
        stop_model_server(proc)


@pytest.mark.integration
def test_the_flow_tracks_registers_and_serves_through_a_tracking_server(
        real_subset: Path, tracking_server: tuple[str, Path], postgres: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
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
    # the run and the registry are rows in PostgreSQL, not in a file beside the server
    with psycopg.connect(postgres) as db:
        assert db.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchone() == ("FINISHED",)
        assert db.execute("SELECT alias FROM registered_model_aliases WHERE name = 'cxr-remote'").fetchall() == [
            ("champion",)]
    assert not list(store.glob("*.db"))

    # the registered model loads from the server, as `cxr predict` and `mlflow models serve` would load it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    model = mlflow.pyfunc.load_model("models:/cxr-remote@champion")
    image = next((real_subset / "test" / "NORMAL").glob("*.jpeg")).read_bytes()
    out = model.predict(pd.DataFrame({"image": [base64.b64encode(image).decode("ascii")]}))
    assert out.shape == (1, 3) and 0.0 <= float(out["probability"].iloc[0]) <= 1.0


@pytest.mark.integration
def test_a_distributed_search_chief_and_two_workers_share_one_run(
        real_subset: Path, tracking_server: tuple[str, Path], tmp_path: Path) -> None:
    """`cxr train` as Keras-Tuner's chief, two `cxr search-worker` processes, one tracking server: the workers
    find the chief's run, run every trial between them over gRPC, and log each as a nested run of it."""
    from mlflow import MlflowClient

    url, _ = tracking_server
    port = free_port()
    oracle = {"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(port)}
    workers, logs = {}, {}
    for tuner_id in ("tuner0", "tuner1"):
        cwd = tmp_path / tuner_id
        cwd.mkdir()
        env = {**os.environ, **oracle, "KERASTUNER_TUNER_ID": tuner_id, "MLFLOW_TRACKING_URI": url,
               "CXR_WORK_DIR": str(cwd / "work"), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "cxr_pneumonia.cli", "search-worker", "--data-dir", str(real_subset),
               "--wait-minutes", "10", "--threads", "1"]
        logs[tuner_id] = (cwd / "stdout.log", cwd / "stderr.log")
        with open(logs[tuner_id][0], "w") as out, open(logs[tuner_id][1], "w") as err:
            workers[tuner_id] = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
    chief, finish = start_cxr_train(tmp_path / "chief", real_subset, "--max-trials", "3", "--model-name",
                                    "cxr-distributed", env={**os.environ, **oracle, "KERASTUNER_TUNER_ID": "chief"},
                                    tracking_uri=url)
    try:
        deadline = time.monotonic() + 900
        while chief.poll() is None and time.monotonic() < deadline:
            # a worker that fails leaves the chief waiting for ever: fail at once, with the worker's reason
            failed = {t: p.returncode for t, p in workers.items() if p.poll() not in (None, 0)}
            assert not failed, f"search worker failed {failed}:\n" + "\n".join(
                logs[t][1].read_text()[-3000:] for t in failed)
            time.sleep(2)
        flow = finish(timeout=1)
        for proc in workers.values():
            proc.wait(timeout=300)
    finally:
        for proc in (chief, *workers.values()):
            proc.kill()
    ran = {}
    for tuner_id, (out, err) in logs.items():
        assert workers[tuner_id].returncode == 0, err.read_text()[-4000:]
        report = json.loads(out.read_text().strip().splitlines()[-1])
        assert report["run_id"] == flow.result["run_id"] and report["tuner_id"] == tuner_id
        ran.update({trial: tuner_id for trial in report["trials"]})
        assert not (tmp_path / tuner_id / "mlflow.db").exists()  # everything went to the server
    assert sorted(ran) == ["0", "1", "2"]  # every trial ran once, on one worker or the other

    client = MlflowClient(url)
    run_id = flow.result["run_id"]
    parent = client.get_run(run_id)
    assert parent.data.metrics["search/completed_trials"] == 3
    assert parent.data.tags["cxr.search_oracle"] == f"127.0.0.1:{port}"
    assert PORT_TAG not in parent.data.tags  # no longer serving: a late worker does not join a finished search
    assert client.get_model_version_by_alias("cxr-distributed", "champion").version == flow.result["registered"][
        "version"]
    trials = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}' and "
                                "tags.`cxr.role` = 'trial'")
    assert {t.data.tags["trial_id"]: t.data.tags["tuner_id"] for t in trials} == ran
    assert all(t.data.metrics["val/auc"] > 0 for t in trials)  # the epochs the workers trained, logged live
    # the workers trained at the chief's settings (smoke: 64 px), not at their own profile's default (96 px)
    assert {t.data.params["trial/image_size"] for t in trials} == {"64"}

    # resumed as the chief again with every trial run: no serving, no waiting for workers, no trial run again
    chief_env = {**os.environ, **oracle, "KERASTUNER_TUNER_ID": "chief"}
    again = run_cxr_train(tmp_path / "chief", real_subset, "--max-trials", "3", "--model-name", "cxr-distributed",
                          "--resume", env=chief_env, tracking_uri=url)
    assert "has run all its trials; not serving" in again.stderr
    # and resumed in one process (tuner0, not chief): Keras-Tuner reloads the chief's state instead of starting over
    local = run_cxr_train(tmp_path / "chief", real_subset, "--max-trials", "3", "--model-name", "cxr-distributed",
                          "--resume", tracking_uri=url)
    for resumed in (again, local):
        resumed_run = client.get_run(resumed.result["run_id"])
        assert resumed_run.data.metrics["search/completed_trials"] == 3
        assert "cxr.search_oracle" not in resumed_run.data.tags
        assert not client.search_runs([parent.info.experiment_id],
                                      f"tags.`mlflow.parentRunId` = '{resumed.result['run_id']}'")
