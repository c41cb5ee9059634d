"""The whole flow on a small real subset: what a person looks for in `mlflow ui` and the registry."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from cxr_model.config import TrainConfig, load_config
from cxr_model.stress import STRESSES
from tests.conftest import FlowRun, run_cxr_train

pytestmark = pytest.mark.integration

PLOTS = {"class_counts", "sample_images", "augmentations", "learning_curves", "learning_curves_member2",
         "confusion_val", "confusion_test", "roc", "calibration", "gradcam_test"}
TEST_METRICS = {"accuracy", "precision", "sensitivity", "specificity", "f1", "roc_auc", "pr_auc", "brier", "ece"}


def _runs(client: MlflowClient, role: str):
    exp = client.get_experiment_by_name("cxr-pneumonia")
    return client.search_runs([exp.experiment_id], f"tags.`cxr.role` = '{role}'", order_by=["attributes.start_time"])


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_parent_run_has_everything(smoke_flow: FlowRun) -> None:
    client = MlflowClient(smoke_flow.tracking_uri)
    (parent,) = _runs(client, "pipeline")
    assert parent.info.status == "FINISHED"
    # tags
    assert parent.data.tags["profile"] == "smoke"
    assert len(parent.data.tags["data_digest"]) == 16
    assert parent.data.tags["git_commit"]
    assert len(parent.data.tags["prefect.flow_run_id"]) == 36 and "prefect.deployment" not in parent.data.tags
    # params: config, data counts, best hyperparameters, final model
    params = parent.data.params
    assert params["cfg/profile"] == "smoke" and params["cfg/image_size"] == "64"
    # the whole config, typed, as a search worker reads it back
    config = TrainConfig.model_validate(mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/config.json"))
    assert config.profile == "smoke" and config.image_size == 64 and config.search_space_params() == load_config(
        "smoke").search_space_params()
    assert int(params["data/train_normal"]) > 0 and int(params["data/test_pneumonia"]) == 16
    assert {"best/blocks", "best/dropout", "best/learning_rate", "model/flops_per_image"} <= set(params)
    assert int(params["model/parameters"]) > 0
    # smoke: two members, each averaging both its epochs; member 2 logs its own curves
    assert [len(m.split(",")) for m in params["train/snapshot_epochs"].split(";")] == [2, 2]
    assert {"val/auc", "member2/val/auc", "member2/train/loss"} <= set(parent.data.metrics)
    assert parent.data.metrics["train/epochs"] == 4  # both members' epochs
    assert params["model/networks_averaged"] == "4"
    # metrics: the headline, every test metric, the validation-chosen threshold
    metrics = parent.data.metrics
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["test_accuracy"] == metrics["test/accuracy"]
    assert {f"test/{m}" for m in TEST_METRICS} <= set(metrics)
    assert metrics["test/threshold"] == metrics["val/final_threshold"]
    assert params["cfg/threshold_rule"] == "stressed_margin" and params["cfg/class_weights"] == "False"
    # validation under every stress, scored at the chosen threshold
    assert {f"val/stressed/{s}_specificity" for s in STRESSES} <= set(metrics)
    assert 0.0 <= metrics["val/threshold_cv/margin_balanced_accuracy"] <= 1.0  # every rule cross-fitted on val
    assert "val/threshold_cv/youden_threshold_logit_sd" in metrics
    assert len(client.get_metric_history(parent.info.run_id, "val/auc")) >= 1  # per-epoch training curve
    stages = ("load", "visualize", "search", "train", "evaluate", "register")
    assert set(smoke_flow.result["seconds"]) == set(stages)  # each stage's wall time, logged and returned
    assert all(metrics[f"time/{s}_seconds"] == smoke_flow.result["seconds"][s] > 0 for s in stages)
    # artifacts
    artifacts = _artifacts(client, parent.info.run_id)
    assert {f"plots/{p}.png" for p in PLOTS} <= artifacts
    assert {"evaluation/summary.md", "evaluation/classification_report.txt", "data/manifest.csv",
            "data/skipped_files.csv", "data/cross_split_duplicates.csv"} <= artifacts
    png = client.download_artifacts(parent.info.run_id, "plots/roc.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the dataset inputs, one per split, carrying the digest
    inputs = {d.dataset.name: d for d in client.get_run(parent.info.run_id).inputs.dataset_inputs}
    assert set(inputs) == {"chest_xray-train", "chest_xray-val", "chest_xray-test"}
    assert all(d.dataset.digest.startswith(parent.data.tags["data_digest"]) for d in inputs.values())


def test_trials_are_nested_runs(smoke_flow: FlowRun) -> None:
    client = MlflowClient(smoke_flow.tracking_uri)
    (parent,) = _runs(client, "pipeline")
    trials = _runs(client, "trial")
    assert len(trials) == 2  # smoke: max_trials=2
    for trial in trials:
        assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"blocks", "filters", "dropout", "dense_units", "learning_rate"} <= set(trial.data.params)
        assert "val/auc" in trial.data.metrics and "train/loss" in trial.data.metrics


def test_first_version_is_champion_and_prefect_has_artifacts(smoke_flow: FlowRun) -> None:
    client = MlflowClient(smoke_flow.tracking_uri)
    result = smoke_flow.result
    champion = client.get_model_version_by_alias("cxr-pneumonia", "champion")
    assert str(champion.version) == result["registered"]["version"] == "1"
    assert champion.run_id == result["run_id"]
    assert float(champion.tags["val_score"]) == pytest.approx(result["registered"]["score"], abs=1e-6)
    # the model card: the run's own threshold and test numbers, as the UI's model page shows them
    assert f"threshold {result['threshold']:.4f}" in champion.description
    rows = {line.split("|")[1].strip(): line for line in champion.description.splitlines() if line.startswith("| ")}
    assert rows["accuracy"].endswith(f"| {result['test']['accuracy']:.4f} |")
    assert rows["roc_auc"].endswith(f"| {result['test']['roc_auc']:.4f} |")
    assert result["run_id"] in champion.description and "Kermany" in champion.description
    mlflow.set_tracking_uri(smoke_flow.tracking_uri)
    try:
        info = mlflow.models.get_model_info("models:/cxr-pneumonia@champion")
    finally:
        mlflow.set_tracking_uri(None)
    assert info.signature.inputs.input_names() == ["image"]
    assert info.signature.outputs.input_names() == ["probability", "label", "threshold"]
    assert info.saved_input_example_info is not None
    with sqlite3.connect(smoke_flow.cwd / "prefect-home" / "prefect.db") as db:
        keys = {k for (k,) in db.execute("select key from artifact")}
    assert {"data-figures", "evaluation-summary"} <= keys


def test_second_run_resumes_search_and_only_a_better_model_takes_champion(smoke_flow: FlowRun, real_subset) -> None:
    client = MlflowClient(smoke_flow.tracking_uri)
    first_score = float(client.get_model_version_by_alias("cxr-pneumonia", "champion").tags["val_score"])
    second = run_cxr_train(smoke_flow.cwd, real_subset, "--resume", "--epochs", "1", env=smoke_flow.env)
    result = second.result
    assert result["registered"]["version"] == "2"
    # --resume continued the finished search: no new trial runs, two completed trials on record
    assert len(_runs(client, "trial")) == 2
    parent = client.get_run(result["run_id"])
    assert parent.data.metrics["search/completed_trials"] == 2
    champion = client.get_model_version_by_alias("cxr-pneumonia", "champion")
    if result["registered"]["score"] > first_score:
        assert str(champion.version) == "2"
    else:
        assert str(champion.version) == "1"
        assert str(client.get_model_version_by_alias("cxr-pneumonia", "challenger").version) == "2"


def test_a_mixup_run_searches_trains_and_registers(tmp_path, real_subset) -> None:
    # end to end with class weights on (off by default: the flag turns them on), which mixup blends like the
    # labels; that the search stays unmixed is tests/test_tasks_search.py's job
    run = run_cxr_train(tmp_path, real_subset, "--mixup", "0.2", "--class-weights", "--members", "1",
                        "--snapshots", "1")
    parent = MlflowClient(run.tracking_uri).get_run(run.result["run_id"])
    assert parent.data.params["cfg/mixup"] == "0.2" and parent.data.params["cfg/class_weights"] == "True"
    assert parent.data.metrics["search/completed_trials"] == 2
    assert run.result["registered"]["version"] == "1"


def test_top_trials_trains_each_trials_network_and_averages_them(tmp_path, real_subset) -> None:
    import keras

    from cxr_model.model import build_convnet, count_flops, ensemble_members
    from cxr_model.search import config_from_hparams

    run = run_cxr_train(tmp_path, real_subset, "--top-trials", "2", "--members", "1", "--snapshots", "1")
    client = MlflowClient(run.tracking_uri)
    params = client.get_run(run.result["run_id"]).data.params
    trials = {t.data.tags["trial_id"]: t for t in _runs(client, "trial")}
    ids = params["search/top_trial_ids"].split(",")
    assert len(ids) == 2 and set(ids) == set(trials)  # smoke: both of its trials, best first
    assert trials[ids[0]].data.metrics["val/auc"] >= trials[ids[1]].data.metrics["val/auc"]  # one epoch each
    assert params["model/architectures"] == "2" and params["model/networks_averaged"] == "2"
    archs = []
    for prefix, trial_id in zip(("model", "model2"), ids, strict=True):
        hp = trials[trial_id].data.params
        assert {k: params[f"{prefix}/{k}"] for k in ("blocks", "filters", "dense_units", "dropout")} == \
            {k: hp[k] for k in ("blocks", "filters", "dense_units", "dropout")}
        kinds = dict(blocks=int, filters=int, convs_per_block=int, dense_units=int, dropout=float, learning_rate=float)
        archs.append(config_from_hparams({k: kind(hp[k]) for k, kind in kinds.items()}, 64))
    assert params["model/ensemble_flops_per_image"] == str(sum(map(count_flops, archs)))
    # the saved model is the two trials' networks, each trained (network 2 logs under member2/)
    model = keras.models.load_model(tmp_path / "work" / "outputs" / run.result["run_id"] / "model.keras",
                                    compile=False)
    assert [m.count_params() for m in ensemble_members(model)] == [build_convnet(a).count_params() for a in archs]
    assert "member2/val/auc" in client.get_run(run.result["run_id"]).data.metrics
    assert run.result["registered"]["version"] == "1"


def test_cli_without_data_explains_where_to_get_it(tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "cxr_pneumonia.cli", "train", "--profile", "smoke"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "CXR_DATA_DIR" in proc.stderr and "chest-xray-pneumonia" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "work").exists()  # refused before any write
