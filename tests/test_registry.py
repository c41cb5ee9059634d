"""Champion/challenger aliases against a real (temporary) MLflow registry."""

from __future__ import annotations

import math
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

import cxr_pneumonia.tasks.register as register_module
from cxr_pneumonia.tasks.register import (
    CHALLENGER,
    CHAMPION,
    assign_alias,
    champion_score,
    registry_lock,
    registry_lock_name,
    should_promote,
)


@pytest.mark.parametrize(
    ("new", "current", "promote"),
    [(0.9, None, True), (0.9, 0.8, True), (0.8, 0.9, False), (0.9, 0.9, False), (math.nan, None, False),
     (0.5, math.nan, True)],
)
def test_should_promote(new: float, current: float | None, promote: bool) -> None:
    assert should_promote(new, current) is promote


def test_worse_version_becomes_challenger(tmp_path: Path) -> None:
    global_uri = mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    name = "cxr-test"
    client.create_registered_model(name)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))

    def new_version() -> str:
        run = client.create_run(exp)
        source = f"{run.info.artifact_uri}/model"
        return client.create_model_version(name, source=source, run_id=run.info.run_id).version

    assert champion_score(client, name) is None
    v1 = new_version()
    assert assign_alias(client, name, v1, 0.90) == (CHAMPION, None)
    v2 = new_version()
    assert assign_alias(client, name, v2, 0.85) == (CHALLENGER, pytest.approx(0.90))
    assert client.get_model_version_by_alias(name, CHAMPION).version == v1
    v3 = new_version()
    assert assign_alias(client, name, v3, 0.95)[0] == CHAMPION
    assert client.get_model_version_by_alias(name, CHAMPION).version == v3
    assert client.get_model_version_by_alias(name, CHALLENGER).version == v2
    # a better score on another basis (other validation images or test-time views) is not compared with
    v4 = new_version()
    assert assign_alias(client, name, v4, 0.99, basis="roc_auc on validation (views scale)")[0] == CHALLENGER
    assert client.get_model_version_by_alias(name, CHAMPION).version == v3
    assert client.get_model_version(name, v4).tags["val_score_basis"] == "roc_auc on validation (views scale)"
    assert mlflow.get_tracking_uri() == global_uri  # the client's store only: the process's URI is untouched


def test_a_registry_that_cannot_be_read_hands_out_no_alias(tmp_path: Path) -> None:
    """A failed read of the champion (a locked database, a server that does not answer) is an error, not "no
    champion": taken for none, it would make any new version champion whatever its score."""
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    name = "cxr-test"
    assert champion_score(client, "no-such-model") is None  # no model at all is an answer
    client.create_registered_model(name)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp)
    v1 = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version
    assign_alias(client, name, v1, 0.90)
    run = client.create_run(exp)
    v2 = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version

    class Unreachable:
        def __getattr__(self, attr):
            return getattr(client, attr)

        def get_registered_model(self, model_name):
            raise MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)

        def get_model_version_by_alias(self, model_name, alias):
            raise MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)

    with pytest.raises(MlflowException, match="database is locked"):
        assign_alias(Unreachable(), name, v2, 0.50)
    assert client.get_model_version(name, v2).aliases == []
    assert client.get_model_version_by_alias(name, CHAMPION).version == v1


def test_registry_lock_name_is_a_valid_limit_name() -> None:
    assert registry_lock_name("cxr-pneumonia") == "cxr-register-cxr-pneumonia"
    assert registry_lock_name("team/a&b<c>%") == "cxr-register-team-a-b-c--"


@pytest.mark.slow
def test_registry_lock_serialises_racing_registrations(tmp_path: Path, monkeypatch) -> None:
    """Two flows register one model at once, the better first: its champion must survive the worse one.

    Each registry read of the champion is slowed so that the second flow reads while the first has read and not
    yet moved the alias. Without the lock that race hands `champion` to the worse version (checked here too, so
    the test shows the hazard it guards against); with it, on a real temporary Prefect server, it does not.
    """
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    read_champion = register_module._champion

    def slow_read(c, name):
        found = read_champion(c, name)
        time.sleep(1.5)
        return found

    monkeypatch.setattr(register_module, "_champion", slow_read)

    def race(name: str, locked: bool) -> tuple[str, str]:
        client.create_registered_model(name)
        versions = []
        for _ in range(2):
            run = client.create_run(exp)
            versions.append(client.create_model_version(name, source=f"{run.info.artifact_uri}/model",
                                                        run_id=run.info.run_id).version)
        errors: list[BaseException] = []

        def flow(version: str, score: float, delay: float) -> None:
            try:
                time.sleep(delay)
                with registry_lock(name, timeout_s=60) if locked else nullcontext():
                    assign_alias(client, name, version, score)
            except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread below
                errors.append(e)

        threads = [threading.Thread(target=flow, args=(versions[0], 0.90, 0.0)),
                   threading.Thread(target=flow, args=(versions[1], 0.80, 0.5))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        if errors:
            raise errors[0]
        return versions[0], client.get_model_version_by_alias(name, CHAMPION).version

    better, champion = race("cxr-unlocked", locked=False)
    assert champion != better  # the hazard: both read "no champion", and the later, worse one wins
    with prefect_test_harness():
        better, champion = race("cxr-locked", locked=True)
        assert champion == better
        assert client.get_model_version_by_alias("cxr-locked", CHALLENGER).version != better
        with get_client(sync_client=True) as prefect:
            assert prefect.read_global_concurrency_limit_by_name(registry_lock_name("cxr-locked")).limit == 1


def test_registry_lock_goes_on_without_a_limit_the_server_refuses(monkeypatch, capsys) -> None:
    """A Prefect server that will not create the limit (e.g. a role without that right) costs the lock, not the
    registration: the body runs, unlocked, and the log says how to create the limit by hand."""
    import httpx
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    request = httpx.Request("POST", "http://prefect/api/v2/concurrency_limits/")
    refused = PrefectHTTPStatusError("forbidden", request=request, response=httpx.Response(403, request=request))

    class Client:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read_global_concurrency_limit_by_name(self, name):
            raise ObjectNotFound(http_exc=Exception(name))

        def create_global_concurrency_limit(self, limit):
            raise refused

    def no_concurrency(*args, **kwargs):
        raise AssertionError("no slot is taken from a limit that does not exist")

    monkeypatch.setattr(register_module, "get_client", lambda sync_client: Client())
    monkeypatch.setattr(register_module, "concurrency", no_concurrency)
    ran = []
    with registry_lock("cxr-pneumonia"):
        ran.append(True)
    assert ran == [True]
    assert "refused to create the concurrency limit 'cxr-register-cxr-pneumonia' (HTTP 403)" in capsys.readouterr().out
