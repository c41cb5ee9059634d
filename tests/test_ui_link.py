"""`make ui`'s line: the address of the experiment's training runs in MLflow 3's UI, or why there is none yet."""

from __future__ import annotations

from pathlib import Path

import mlflow

from cxr_pneumonia.ui_link import main, runs_line, runs_view_url, ui_base


def test_the_runs_view_asks_for_the_machine_learning_view() -> None:
    assert (runs_view_url("http://127.0.0.1:5000/", "7")
            == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning")
    assert ui_base("http://tracking:5000/") == "http://tracking:5000"
    assert ui_base("sqlite:///mlflow.db") == "http://127.0.0.1:5000"


def test_a_missing_local_store_is_named_and_not_created(tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    line = runs_line(f"sqlite:///{store}")
    assert line.startswith("no runs in") and "make train" in line
    assert not store.exists()


def test_the_line_links_the_experiments_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("cxr-pneumonia", artifact_location=(tmp_path / "a").as_uri())
    assert runs_line(uri) == f"training runs: {runs_view_url('http://127.0.0.1:5000', experiment_id)}"
    assert "no experiment 'other'" in runs_line(uri, "other")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main([]) == 0
    assert f"/#/experiments/{experiment_id}/runs" in capsys.readouterr().out


def test_cxr_train_ends_with_the_runs_address(tmp_path: Path, monkeypatch, capsys) -> None:
    from cxr_pneumonia.cli import _print_runs_view

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = mlflow.MlflowClient(uri).create_experiment("mine", artifact_location=(tmp_path / "a").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    _print_runs_view("mine")
    assert capsys.readouterr().out.startswith(f"training runs: {runs_view_url('http://127.0.0.1:5000', experiment_id)}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # a server that does not answer
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    _print_runs_view("mine")
    assert "could not look up" in capsys.readouterr().out
