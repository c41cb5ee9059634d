"""Champion/challenger aliases against a real (temporary) MLflow registry."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from tasks.register import CHALLENGER, CHAMPION, assign_alias, champion_score, should_promote


@pytest.mark.parametrize(
    ("new", "current", "promote"),
    [(0.9, None, True), (0.9, 0.8, True), (0.8, 0.9, False), (0.9, 0.9, False), (math.nan, None, False),
     (0.5, math.nan, True)],
)
def test_should_promote(new: float, current: float | None, promote: bool) -> None:
    assert should_promote(new, current) is promote


def test_worse_version_becomes_challenger(tmp_path: Path) -> None:
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
    assert mlflow.get_tracking_uri()  # the global URI was never touched by this test
