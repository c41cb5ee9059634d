"""The team stack (docker/compose.yaml) in real containers: PostgreSQL, MLflow, Prefect, the worker, search workers
and serving, and what each of them does when a container restarts or dies.

Run by `make stack-test` (docker/stack_test.sh sets up Docker, builds the images and points CXR_STACK_COMPOSE at
the Compose binary); skipped in `make test`.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from cxr_pneumonia.model_server import free_port
from tests.conftest import REPO, real_data_dir

COMPOSE = os.environ.get("CXR_STACK_COMPOSE")
pytestmark = [pytest.mark.stack,
              pytest.mark.skipif(not COMPOSE, reason="the team stack runs in containers: `make stack-test`")]
PROJECT = "cxr-stack-test"
DEPLOYMENT = "cxr-pneumonia-train/smoke"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class Stack:
    """One Compose project of docker/compose.yaml, with its ports published on loopback."""

    def __init__(self, env: dict, log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.mlflow = f"http://127.0.0.1:{env['MLFLOW_PORT']}"
        self.api = f"http://127.0.0.1:{env['PREFECT_PORT']}/api"
        self.serve = f"http://127.0.0.1:{env['SERVE_PORT']}"

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [COMPOSE, "-f", str(REPO / "docker" / "compose.yaml"), "--profile", "serve", *args]
        proc = subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def sql(self, database: str, query: str) -> list[list[str]]:
        """Rows of a query, run by psql inside the postgres container (tab-separated, unaligned)."""
        out = self.compose("exec", "-T", "postgres", "psql", "-U", "postgres", "-d", database, "-At", "-F", "\t",
                           "-c", query, timeout=60).stdout
        return [line.split("\t") for line in out.splitlines() if line]

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service, check=False, timeout=120).stdout

    def run_deployment(self, cfg: dict, env: dict | None = None) -> str:
        deployment = requests.get(f"{self.api}/deployments/name/{DEPLOYMENT}", timeout=10).json()
        body = {"parameters": {"cfg": cfg}, "job_variables": {"env": env or {}}}
        flow_run = requests.post(f"{self.api}/deployments/{deployment['id']}/create_flow_run", json=body, timeout=10)
        flow_run.raise_for_status()
        return flow_run.json()["id"]

    def flow_state(self, flow_run_id: str) -> dict:
        return requests.get(f"{self.api}/flow_runs/{flow_run_id}", timeout=10).json()["state"]

    def wait_flow(self, flow_run_id: str, timeout: float = 900, until: set[str] = TERMINAL) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                state = self.flow_state(flow_run_id)
            except requests.RequestException:  # the server restarting: ask again
                state = {"type": None}
            if state["type"] in until:
                return state
            time.sleep(3)
        raise AssertionError(f"flow run {flow_run_id} not in {until} after {timeout:.0f} s: {state}\n"
                             f"{self.logs('worker')[-6000:]}")

    def mlflow_runs(self, flow_run_id: str) -> list[list[str]]:
        """(run id, status) of the MLflow run a Prefect flow run made, from PostgreSQL's rows."""
        return self.sql("mlflow", "SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                                  f"WHERE t.key = 'prefect.flow_run_id' AND t.value = '{flow_run_id}'")

    def trials(self, parent_run_id: str) -> list[list[str]]:
        """(trial id, tuner id, status) of the nested trial runs of a flow's MLflow run."""
        return self.sql("mlflow", "SELECT tr.value, tu.value, r.status FROM runs r "
                                  "JOIN tags p ON p.run_uuid = r.run_uuid AND p.key = 'mlflow.parentRunId' "
                                  "JOIN tags tr ON tr.run_uuid = r.run_uuid AND tr.key = 'trial_id' "
                                  "JOIN tags tu ON tu.run_uuid = r.run_uuid AND tu.key = 'tuner_id' "
                                  f"WHERE p.value = '{parent_run_id}'")

    def champion(self, model: str) -> list[list[str]]:
        return self.sql("mlflow", "SELECT a.version, v.run_id FROM registered_model_aliases a JOIN model_versions v "
                                  "ON v.name = a.name AND v.version = a.version "
                                  f"WHERE a.name = '{model}' AND a.alias = 'champion'")

    def wait_for(self, what: str, check, timeout: float = 120, poll: float = 2):
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = check()
            except (requests.RequestException, AssertionError, KeyError, ValueError):
                found = None
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout:.0f} s")
            time.sleep(poll)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data = real_data_dir()
    assert data is not None, "the stack test needs the dataset: set CXR_DATA_DIR or place it at ../shared/data"
    env = {**os.environ, "COMPOSE_PROJECT_NAME": PROJECT, "CXR_DATA_HOST_DIR": str(data.resolve()),
           "MLFLOW_DB_PASSWORD": secrets.token_hex(8), "PREFECT_DB_PASSWORD": secrets.token_hex(8),
           "MLFLOW_PORT": str(free_port()), "PREFECT_PORT": str(free_port()), "SERVE_PORT": str(free_port()),
           "CXR_IMAGE_TAG": os.environ.get("CXR_IMAGE_TAG", "stack-test"), "CXR_PULL_POLICY": "never",
           "CXR_SEARCH_WORKERS": "0", "CXR_SEARCH_THREADS": "1", "CXR_SEARCH_WAIT_MINUTES": "5"}
    stack = Stack(env, tmp_path_factory.mktemp("stack"))
    started = time.monotonic()
    try:
        stack.compose("up", "-d", "--wait", "--wait-timeout", "400", "postgres", "mlflow", "prefect-server",
                      "worker", timeout=480)
        stack.wait_for("the worker's deployments", lambda: requests.get(
            f"{stack.api}/deployments/name/{DEPLOYMENT}", timeout=5).ok, timeout=180)
        print(f"stack up in {time.monotonic() - started:.0f} s")
        yield stack
    finally:
        logs = stack.compose("logs", "--no-color", "--timestamps", check=False, timeout=120).stdout
        (stack.log_dir / "compose.log").write_text(logs)
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "20", check=False, timeout=300)
        print(f"stack logs: {stack.log_dir / 'compose.log'}")


def test_smoke_deployment_runs_on_the_worker_and_registers_a_champion(stack: Stack) -> None:
    started = time.monotonic()
    flow_run_id = stack.run_deployment({"profile": "smoke", "threads": 2})
    state = stack.wait_flow(flow_run_id)
    assert state["type"] == "COMPLETED", f"{state}\n{stack.logs('worker')[-6000:]}"
    # the run, its trials and the registry are rows in the stack's PostgreSQL
    ((run_id, status),) = stack.mlflow_runs(flow_run_id)
    assert status == "FINISHED"
    assert {status for _, _, status in stack.trials(run_id)} == {"FINISHED"}
    ((version, champion_run),) = stack.champion("cxr-pneumonia")
    assert champion_run == run_id and int(version) >= 1
    # artifacts went over HTTP to the server's volume, not into the worker
    found = stack.compose("exec", "-T", "mlflow", "sh", "-c", "find /mlartifacts -name learning_curves.png").stdout
    assert run_id in found
    # Prefect's own rows: the flow run is in Prefect's database
    assert stack.sql("prefect", f"SELECT state_type FROM flow_run WHERE id = '{flow_run_id}'") == [["COMPLETED"]]
    print(f"smoke deployment: {time.monotonic() - started:.0f} s")


def test_serve_scores_a_real_film_over_http(stack: Stack) -> None:
    started = time.monotonic()
    assert stack.champion("cxr-pneumonia"), "no champion to serve (the smoke deployment did not register one)"
    stack.compose("up", "-d", "--wait", "--wait-timeout", "300", "serve", timeout=360)
    try:
        film = next((Path(stack.env["CXR_DATA_HOST_DIR"]) / "test" / "PNEUMONIA").glob("*.jpeg"))
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(film.read_bytes()).decode("ascii")]]}}
        answer = requests.post(f"{stack.serve}/invocations", json=body, timeout=120)
        assert answer.status_code == 200, answer.text[:2000]
        (prediction,) = answer.json()["predictions"]
        assert 0.0 <= float(prediction["probability"]) <= 1.0 and prediction["label"] in ("NORMAL", "PNEUMONIA")
    finally:
        stack.compose("stop", "serve", timeout=120)
    print(f"serve: {time.monotonic() - started:.0f} s")


def test_a_distributed_search_runs_on_two_search_worker_replicas(stack: Stack) -> None:
    """The flow run on `worker` is the chief (KERASTUNER_* in the run's environment); two replicas of
    `search-worker` find its run and train every trial between them."""
    started = time.monotonic()
    stack.compose("up", "-d", "--no-recreate", "--scale", "search-worker=2", "search-worker", timeout=300)
    try:
        chief = {"KERASTUNER_TUNER_ID": "chief", "KERASTUNER_ORACLE_IP": "0.0.0.0", "KERASTUNER_ORACLE_PORT": "8000"}
        cfg = {"profile": "smoke", "max_trials": 3, "threads": 1, "model_name": "cxr-distributed"}
        flow_run_id = stack.run_deployment(cfg, env=chief)
        state = stack.wait_flow(flow_run_id)
        logs = stack.logs("search-worker")
        assert state["type"] == "COMPLETED", f"{state}\n{stack.logs('worker')[-4000:]}\n{logs[-4000:]}"
    finally:
        stack.compose("rm", "--stop", "--force", "search-worker", timeout=120)
    ((run_id, status),) = stack.mlflow_runs(flow_run_id)
    trials = stack.trials(run_id)
    assert sorted(trial for trial, _, _ in trials) == ["0", "1", "2"]  # each trial ran once
    assert {status for _, _, status in trials} == {"FINISHED"}
    tuner_ids = {tuner for _, tuner, _ in trials}
    assert "chief" not in tuner_ids and all(t.startswith("tuner-") for t in tuner_ids)
    # both replicas joined the chief's run (each names it as it starts)
    joined = {line.split("Search worker ")[1].split(":")[0] for line in logs.splitlines()
              if f"run {run_id}" in line and "Search worker " in line}
    assert len(joined) == 2, logs[-4000:]
    print(f"distributed search: {time.monotonic() - started:.0f} s, trials by {sorted(tuner_ids)}")


def test_a_postgres_restart_loses_nothing_and_the_servers_reconnect(stack: Stack) -> None:
    started = time.monotonic()
    champion = stack.champion("cxr-pneumonia")
    assert champion
    stack.compose("restart", "postgres", timeout=180)

    def mlflow_answers() -> bool:
        r = requests.get(f"{stack.mlflow}/api/2.0/mlflow/registered-models/alias",
                         params={"name": "cxr-pneumonia", "alias": "champion"}, timeout=10)
        return r.ok and r.json()["model_version"]["version"] == champion[0][0]

    def prefect_answers() -> bool:
        return requests.get(f"{stack.api}/deployments/name/{DEPLOYMENT}", timeout=10).ok

    stack.wait_for("MLflow reads the registry again after the restart", mlflow_answers, timeout=120)
    stack.wait_for("Prefect reads its deployments again after the restart", prefect_answers, timeout=120)
    # and writes: a new experiment through MLflow
    r = requests.post(f"{stack.mlflow}/api/2.0/mlflow/experiments/create", json={"name": "after-postgres-restart"},
                      timeout=30)
    assert r.ok, r.text
    assert stack.champion("cxr-pneumonia") == champion
    print(f"postgres restart: {time.monotonic() - started:.0f} s")


def test_an_mlflow_restart_mid_flow_leaves_no_run_running(stack: Stack) -> None:
    """The flow's logging retries while the tracking server restarts; the run finishes (or the flow fails naming
    the server): either way no run of it stays RUNNING."""
    started = time.monotonic()
    flow_run_id = stack.run_deployment({"profile": "smoke", "threads": 2, "experiment_name": "mlflow-restart"})
    stack.wait_for("the flow's MLflow run", lambda: stack.mlflow_runs(flow_run_id), timeout=300, poll=1)
    stack.compose("restart", "mlflow", timeout=180)
    state = stack.wait_flow(flow_run_id)
    ((run_id, status),) = stack.mlflow_runs(flow_run_id)
    if state["type"] == "COMPLETED":
        assert status == "FINISHED"
    else:
        assert state["type"] == "FAILED" and "mlflow" in (state.get("message") or "").lower(), state
    running = [t for t in stack.trials(run_id) if t[2] == "RUNNING"]
    assert status != "RUNNING" and not running, (status, running)
    print(f"mlflow restart: flow {state['type']}, run {status}, {time.monotonic() - started:.0f} s")


def test_a_killed_worker_shows_crashed_and_resume_skips_finished_trials(stack: Stack) -> None:
    started = time.monotonic()
    cfg = {"profile": "smoke", "threads": 2, "max_trials": 5, "search_epochs": 2, "experiment_name": "worker-kill",
           "model_name": "cxr-worker-kill"}
    first = stack.run_deployment(cfg)
    run_id = stack.wait_for("the flow's MLflow run", lambda: stack.mlflow_runs(first), timeout=300, poll=1)[0][0]
    stack.wait_for("a finished trial", lambda: [t for t in stack.trials(run_id) if t[2] == "FINISHED"],
                   timeout=400, poll=1)
    assert stack.flow_state(first)["type"] == "RUNNING"
    stack.compose("kill", "-s", "SIGKILL", "worker", timeout=60)
    killed = time.monotonic()
    done_before = {t for t, _, status in stack.trials(run_id) if status == "FINISHED"}
    assert len(done_before) < 5, "the search finished before the kill"
    # no final state came from the dead process: the missing heartbeats mark it
    state = stack.wait_flow(first, timeout=300, until={"CRASHED"} | TERMINAL)
    assert state["type"] == "CRASHED", state
    print(f"worker kill: Crashed {time.monotonic() - killed:.0f} s after the kill")

    stack.compose("up", "-d", "--wait", "--wait-timeout", "300", "worker", timeout=360)
    second = stack.run_deployment({**cfg, "resume": True})
    state = stack.wait_flow(second)
    assert state["type"] == "COMPLETED", f"{state}\n{stack.logs('worker')[-6000:]}"
    ((resumed_id, status),) = stack.mlflow_runs(second)
    assert status == "FINISHED"
    again = {t for t, _, _ in stack.trials(resumed_id)}
    assert not again & done_before, f"finished trials run again: {sorted(again & done_before)}"
    assert done_before | again == {str(i) for i in range(5)}
    # the resumed flow closed the killed flow's run and its trial that was running: nothing shows as running
    assert stack.mlflow_runs(first) == [[run_id, "FAILED"]]
    assert not [t for t in stack.trials(run_id) if t[2] == "RUNNING"], stack.trials(run_id)
    print(f"worker kill and resume: {time.monotonic() - started:.0f} s; trials before {sorted(done_before)}, "
          f"after {sorted(again)}")
