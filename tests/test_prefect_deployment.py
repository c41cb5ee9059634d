"""The flow as a Prefect deployment: a real `prefect server`, the repo's prefect.yaml, a process worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from cxr_pneumonia.model_server import free_port
from tests.conftest import REPO

pytestmark = pytest.mark.integration
PREFECT = str(Path(sys.executable).parent / "prefect")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`prefect server start` on a free loopback port with its own home; yields the environment that points at it."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    with open(home / "server.log", "wb") as log:
        proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if requests.get(f"{env['PREFECT_API_URL']}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"prefect server did not start:\n{(home / 'server.log').read_text()[-4000:]}")
            time.sleep(1)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def _prefect(args: list[str], env: dict, cwd: Path, timeout: float = 300) -> str:
    proc = subprocess.run([PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_a_deployment_from_prefect_yaml_runs_on_a_worker(prefect_server: dict, real_subset: Path,
                                                         tmp_path: Path) -> None:
    """What README's Backends says a team does: create a process pool, `prefect deploy` from the checkout, run the
    deployment with a `cfg` parameter, and let a worker whose environment names the data, the tracking store and
    the work folder run it."""
    from mlflow import MlflowClient

    env, api = prefect_server, prefect_server["PREFECT_API_URL"]
    _prefect(["work-pool", "create", "cxr-test", "--type", "process"], env, tmp_path)
    _prefect(["--no-prompt", "deploy", "--name", "smoke", "--pool", "cxr-test"], env, REPO)  # the checkout's yaml
    deployment = requests.get(f"{api}/deployments/name/cxr-pneumonia-train/smoke", timeout=10).json()
    assert deployment["parameters"] == {"cfg": {"profile": "smoke"}}
    cfg = {"profile": "smoke", "seed": 7, "experiment_name": "cxr-deployed", "model_name": "cxr-deployed"}
    flow_run = requests.post(f"{api}/deployments/{deployment['id']}/create_flow_run",
                             json={"parameters": {"cfg": cfg}}, timeout=10).json()

    # the worker's environment, not the deployment, says where the data, the store and the work folder are; the
    # experiment's artifacts go beside the store (a new experiment's would go to ./mlruns in the checkout)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    client.create_experiment("cxr-deployed", artifact_location=(tmp_path / "artifacts").as_uri())
    worker_env = {**env, "CXR_DATA_DIR": str(real_subset), "CXR_WORK_DIR": str(tmp_path / "work"),
                  "MLFLOW_TRACKING_URI": tracking_uri}
    _prefect(["worker", "start", "--pool", "cxr-test", "--run-once"], worker_env, tmp_path, timeout=900)

    state = requests.get(f"{api}/flow_runs/{flow_run['id']}", timeout=10).json()["state"]
    assert state["type"] == "COMPLETED", state
    (run,) = client.search_runs([client.get_experiment_by_name("cxr-deployed").experiment_id],
                                "tags.`cxr.role` = 'pipeline'")
    assert run.data.params["cfg/seed"] == "7" and run.data.params["cfg/profile"] == "smoke"
    # each UI leads to the other
    assert run.data.tags["prefect.flow_run_id"] == flow_run["id"] and run.data.tags["prefect.deployment"] == "smoke"
    assert run.data.tags["prefect.flow_run_name"] == flow_run["name"]
    assert client.get_model_version_by_alias("cxr-deployed", "champion").run_id == run.info.run_id
    assert any((tmp_path / "work" / "cache").iterdir())  # the worker's CXR_WORK_DIR
