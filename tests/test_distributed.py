"""Distributed search settings and the worker's refusals (the chief and workers end to end:
tests/test_tracking_server.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from cxr_model.config import load_config
from cxr_model.distributed import PORT_TAG, SearchRole, check_can_serve, check_tuner, search_role, worker_role
from cxr_model.errors import ConfigError, DataError, ServerError

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
    ({"KERASTUNER_ORACLE_IP": "h"}, "KERASTUNER_TUNER_ID and KERASTUNER_ORACLE_PORT empty or not set"),
    ({**ENV, "KERASTUNER_ORACLE_IP": ""}, "KERASTUNER_ORACLE_IP empty or not set"),  # present: Keras-Tuner's test
    ({**ENV, "KERASTUNER_ORACLE_PORT": "http"}, "'http' is not a port number"),
    ({**ENV, "KERASTUNER_ORACLE_PORT": " 8000"}, "' 8000' is not a port number"),  # gRPC reads the raw string
    ({**ENV, "KERASTUNER_ORACLE_PORT": "70000"}, "'70000' is not a port number"),
    ({**ENV, "KERASTUNER_ORACLE_IP": "::1"}, r"write an IPv6 address in brackets, as \[::1\]"),
])
def test_incomplete_or_malformed_settings_are_named(env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        search_role(env)


def test_hyperband_is_refused_only_for_a_distributed_search() -> None:
    check_tuner(None, "hyperband")
    check_tuner(search_role(ENV), "bayesian")
    with pytest.raises(ConfigError, match="--tuner hyperband cannot run distributed"):
        check_tuner(search_role(ENV), "hyperband")


def test_a_worker_needs_a_worker_id() -> None:
    with pytest.raises(ConfigError, match="a search worker needs"):
        worker_role({})
    with pytest.raises(ConfigError, match="KERASTUNER_TUNER_ID=chief is the chief's"):
        worker_role({**ENV, "KERASTUNER_TUNER_ID": "chief"})


def test_a_chief_that_cannot_listen_is_refused() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_can_serve(SearchRole("chief", "chief", "127.0.0.1", port))
    check_can_serve(SearchRole("chief", "chief", "127.0.0.1", port))  # free again


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 on this host")
def test_a_bracketed_ipv6_address_is_bound_as_grpc_binds_it() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback")
    check_can_serve(search_role({**ENV, "KERASTUNER_TUNER_ID": "chief", "KERASTUNER_ORACLE_IP": "[::1]",
                                 "KERASTUNER_ORACLE_PORT": str(port)}))


def _cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr_pneumonia.cli", *args], cwd=cwd, capture_output=True, text=True,
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
def oracle_port() -> Iterator[int]:
    """A gRPC server with no services on a loopback port: what a worker's connection check sees of a chief."""
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None)


def _serving_run(config: dict, port: int, digest: str = "0123456789abcdef") -> str:
    """A RUNNING run as the chief's flow leaves it while serving: its config, a data digest and the port tag."""
    with mlflow.start_run() as run:
        mlflow.log_dict(config, "config.json")
        mlflow.set_tags({"data_digest": digest, PORT_TAG: str(port)})
    mlflow.MlflowClient().update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


@pytest.fixture
def worker_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, oracle_port: int) -> int:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("CXR_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "tuner0")
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", str(oracle_port))
    experiment = mlflow.MlflowClient().create_experiment("cxr-pneumonia",
                                                         artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment)
    return oracle_port


def search_worker(data_dir: Path | None = None, run_id: str | None = None, wait_s: float = 5) -> dict:
    """The worker flow's two tasks, run as plain functions (no Prefect server)."""
    from cxr_pneumonia.tasks.search import join_search, run_worker_trials

    return run_worker_trials.fn(join_search.fn(data_dir, None, None, run_id, wait_s))


def test_worker_finds_the_chief_by_port_and_refuses_other_data(worker_env: int, synthetic_dataset: Path,
                                                               tmp_path: Path) -> None:
    from cxr_pneumonia.tasks.search import find_chief_run

    config = load_config("smoke", data_dir=synthetic_dataset).model_dump(mode="json")
    chief_run = _serving_run(config, worker_env)
    assert find_chief_run(worker_env) == chief_run
    with pytest.raises(ConfigError, match=f"no running `cxr train` serves a search on port {worker_env + 1}"):
        find_chief_run(worker_env + 1)
    # the worker rebuilds the manifest from its own copy: another digest than the chief's is refused, no trial run
    with pytest.raises(DataError, match=f"digest [0-9a-f]{{16}}, the chief's run {chief_run} has "
                                              "0123456789abcdef"):
        search_worker(data_dir=synthetic_dataset, wait_s=5)
    # a second running run on the port (a chief that crashed): refused unless --run-id names one
    _serving_run(config, worker_env)
    with pytest.raises(ConfigError, match="2 running flows say they serve a search on port"):
        search_worker(data_dir=synthetic_dataset, wait_s=5)
    mlflow.MlflowClient().set_terminated(chief_run)
    with pytest.raises(ConfigError, match=f"run {chief_run} is FINISHED, not a search in progress"):
        search_worker(data_dir=synthetic_dataset, run_id=chief_run, wait_s=5)
    assert mlflow.MlflowClient().get_run(chief_run).info.artifact_uri.startswith((tmp_path / "artifacts").as_uri())


def test_a_worker_waits_for_the_chief_then_says_none_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    for name, value in {**ENV, "KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ServerError, match=f"no search chief answers at 127.0.0.1:{port} \\(waited 1 s\\)"):
        search_worker(wait_s=1)


def test_a_worker_refuses_an_oracle_with_another_space(synthetic_dataset: Path) -> None:
    import keras_tuner as kt

    from cxr_model.search import check_same_space

    cfg = load_config("smoke", data_dir=synthetic_dataset)
    other = kt.HyperParameters()
    other.Int("blocks", 1, 9)

    class Tuner:  # only what the check reads: the oracle's space, as the chief's oracle answers it
        oracle = SimpleNamespace(get_space=lambda: other)

    with pytest.raises(ConfigError, match="searches another space than run r1's config"):
        check_same_space(Tuner, cfg, search_role(ENV).address, "r1")
    from cxr_model.search import SearchSpace, sample_config

    same = kt.HyperParameters()
    sample_config(same, cfg.image_size, SearchSpace.from_config(cfg))
    same = kt.HyperParameters.from_proto(same.to_proto())  # as it comes over gRPC: defaults filled in
    assert same.get_config() != kt.HyperParameters().get_config()
    Tuner.oracle = SimpleNamespace(get_space=lambda: same)
    check_same_space(Tuner, cfg, search_role(ENV).address, "r1")


def test_a_resumed_search_adopts_the_other_modes_tuner_file(tmp_path: Path) -> None:
    """Keras-Tuner reloads only `<its id>.json`: a local search writes tuner0.json, a chief chief.json."""
    from cxr_model.search import adopt_tuner_state

    (tmp_path / "oracle.json").write_text("{}")
    (tmp_path / "chief.json").write_text('{"from": "chief"}')
    adopt_tuner_state(tmp_path, "tuner0")
    assert (tmp_path / "tuner0.json").read_text() == '{"from": "chief"}'
    (tmp_path / "tuner0.json").write_text('{"own": 1}')
    adopt_tuner_state(tmp_path, "tuner0")  # its own file is kept
    assert (tmp_path / "tuner0.json").read_text() == '{"own": 1}'
    adopt_tuner_state(tmp_path / "missing", "chief")  # nothing to adopt: nothing done


def test_a_rerun_trial_retires_the_run_its_dead_worker_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_pneumonia.tasks.search import retire_unfinished_runs

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("x", artifact_location=(tmp_path / "a").as_uri())
    parent = client.create_run(experiment).info.run_id
    tags = {"mlflow.parentRunId": parent, "cxr.role": "trial"}
    dead = client.create_run(experiment, tags={**tags, "trial_id": "3"}).info.run_id
    other = client.create_run(experiment, tags={**tags, "trial_id": "4"}).info.run_id
    retire_unfinished_runs(parent, "3")
    assert client.get_run(dead).info.status == "KILLED" and "cxr.superseded" in client.get_run(dead).data.tags
    assert client.get_run(other).info.status == "RUNNING"


@pytest.mark.parametrize(("statuses", "max_trials", "done"), [
    (["COMPLETED", "FAILED", "COMPLETED"], 3, True),
    (["COMPLETED", "COMPLETED"], 3, False),  # a trial still to create
    (["COMPLETED", "RUNNING", "COMPLETED"], 3, False),  # interrupted: Keras-Tuner runs it again
    (["COMPLETED", "INVALID", "COMPLETED"], 3, False),  # awaiting a retry
    (["COMPLETED"] * 3, None, False),  # hyperband: no fixed count
])
def test_a_chief_serves_unless_every_trial_has_run(statuses: list[str], max_trials: int | None, done: bool) -> None:
    from cxr_model.search import search_done

    oracle = SimpleNamespace(max_trials=max_trials,
                             trials={str(i): SimpleNamespace(status=s) for i, s in enumerate(statuses)})
    assert search_done(oracle) is done


def test_the_flow_runs_locally_or_as_chief_never_as_a_worker() -> None:
    """`flow_role`: what the CLI checks before the flow and the search task again (a deployment skips the CLI)."""
    from cxr_model.distributed import flow_role

    assert flow_role("hyperband", {}) is None
    assert flow_role("random", {**ENV, "KERASTUNER_TUNER_ID": "chief"}).role == "chief"
    with pytest.raises(ConfigError, match="KERASTUNER_TUNER_ID=tuner0 makes this process a search worker"):
        flow_role("random", ENV)
    with pytest.raises(ConfigError, match="--tuner hyperband cannot run distributed"):
        flow_role("hyperband", {**ENV, "KERASTUNER_TUNER_ID": "chief"})
