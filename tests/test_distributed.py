"""Distributed search settings and the worker's refusals (the chief and workers end to end:
tests/test_tracking_server.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from cxr_model.config import DataConfigError, load_config
from cxr_model.distributed import PORT_TAG, SearchRole, check_can_serve, search_role, worker_role

ENV = {"KERASTUNER_TUNER_ID": "tuner0", "KERASTUNER_ORACLE_IP": "10.0.0.5", "KERASTUNER_ORACLE_PORT": "8000"}


def test_roles_come_from_keras_tuners_three_variables() -> None:
    assert search_role({}) is None
    assert search_role(ENV) == SearchRole("worker", "tuner0", "10.0.0.5", 8000)
    chief = search_role({**ENV, "KERASTUNER_TUNER_ID": "chief", "KERASTUNER_ORACLE_IP": "0.0.0.0"})
    assert chief.role == "chief" and chief.address == "0.0.0.0:8000"
    assert worker_role(ENV).tuner_id == "tuner0"


@pytest.mark.parametrize(("env", "message"), [
    ({"KERASTUNER_TUNER_ID": "tuner0"}, "KERASTUNER_TUNER_ID set without KERASTUNER_ORACLE_IP"),
    ({"KERASTUNER_TUNER_ID": "t", "KERASTUNER_ORACLE_PORT": "1"}, "and KERASTUNER_ORACLE_PORT set without"),
    ({"KERASTUNER_ORACLE_IP": "h"}, "KERASTUNER_TUNER_ID and KERASTUNER_ORACLE_PORT not"),
    ({**ENV, "KERASTUNER_ORACLE_PORT": "http"}, "'http' is not a port number"),
    ({**ENV, "KERASTUNER_ORACLE_PORT": "70000"}, "'70000' is not a port number"),
])
def test_incomplete_or_malformed_settings_are_named(env: dict, message: str) -> None:
    with pytest.raises(DataConfigError, match=message):
        search_role(env)


def test_a_worker_needs_a_worker_id() -> None:
    with pytest.raises(DataConfigError, match="a search worker needs"):
        worker_role({})
    with pytest.raises(DataConfigError, match="KERASTUNER_TUNER_ID=chief is the chief's"):
        worker_role({**ENV, "KERASTUNER_TUNER_ID": "chief"})


def test_a_chief_that_cannot_listen_is_refused() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DataConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_can_serve(SearchRole("chief", "chief", "127.0.0.1", port))
    check_can_serve(SearchRole("chief", "chief", "127.0.0.1", port))  # free again


def _cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr_model.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), **env}, timeout=120)


def test_cli_refuses_a_flow_on_a_worker_and_a_worker_without_settings(tmp_path: Path, synthetic_dataset: Path) -> None:
    train = ["train", "--profile", "smoke", "--data-dir", str(synthetic_dataset)]
    proc = _cli(train, ENV, tmp_path)
    assert proc.returncode == 2 and "KERASTUNER_TUNER_ID=tuner0 makes this process a search worker" in proc.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        chief = {**ENV, "KERASTUNER_TUNER_ID": "chief", "KERASTUNER_ORACLE_IP": "127.0.0.1",
                 "KERASTUNER_ORACLE_PORT": str(taken.getsockname()[1])}
        proc = _cli(train, chief, tmp_path)
    assert proc.returncode == 2 and "the search chief cannot listen on 127.0.0.1" in proc.stderr
    proc = _cli(["search-worker"], {}, tmp_path)
    assert proc.returncode == 2 and "a search worker needs KERASTUNER_TUNER_ID" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before any store was touched


@pytest.fixture
def chief_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic_dataset: Path) -> str:
    """A RUNNING run as the chief's flow leaves it while serving: its config, a data digest and the port tag."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("CXR_WORK_DIR", str(tmp_path / "work"))
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    mlflow.set_experiment("cxr-pneumonia")
    with mlflow.start_run() as run:
        mlflow.log_dict(load_config("smoke", data_dir=synthetic_dataset).model_dump(mode="json"), "config.json")
        mlflow.set_tags({"data_digest": "0123456789abcdef", PORT_TAG: "8000"})
    mlflow.MlflowClient().update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


def test_worker_finds_the_chief_by_port_and_refuses_other_data(chief_run: str, synthetic_dataset: Path) -> None:
    from tasks.search import find_chief_run, search_worker

    assert find_chief_run(8000, wait_s=0) == chief_run
    with pytest.raises(DataConfigError, match="no running `cxr train` serves a search on port 8001"):
        find_chief_run(8001, wait_s=0)
    # the worker rebuilds the manifest from its own copy: another digest than the chief's is refused, no trial run
    with pytest.raises(DataConfigError, match=f"digest [0-9a-f]{{16}}, the chief's run {chief_run} has "
                                              "0123456789abcdef"):
        search_worker(data_dir=synthetic_dataset, wait_s=0)
    mlflow.MlflowClient().set_terminated(chief_run)
    with pytest.raises(DataConfigError, match="no running `cxr train` serves"):
        search_worker(data_dir=synthetic_dataset, wait_s=0)
    with pytest.raises(DataConfigError, match=f"run {chief_run} is FINISHED, not a search in progress"):
        search_worker(data_dir=synthetic_dataset, run_id=chief_run)
