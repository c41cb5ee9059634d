"""The tasks' MLflow plumbing, the visualize task, the evaluation summary and the model card, against a real
(temporary) MLflow store; tasks run as plain functions (`.fn`), without a Prefect server."""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from cxr_model.cache import decoded_images
from cxr_model.config import load_config
from cxr_model.data import index_and_split
from cxr_model.errors import DataError
from cxr_pneumonia.tasks.data import DataHandle
from cxr_pneumonia.tasks.evaluate import Evaluation, summary_markdown
from cxr_pneumonia.tasks.register import CARD_HEADLINE_CHARS, model_card
from cxr_pneumonia.tasks.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    MlflowEpochLogger,
    close_crashed_runs,
    in_run,
    log_figure,
    metric_key,
    record_config,
    retry_on_io,
    use_experiment,
)
from cxr_pneumonia.tasks.visualize import visualize


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> mlflow.MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment)
    return client


def test_metric_keys_are_prefixed_by_split() -> None:
    assert metric_key("val_auc") == "val/auc" and metric_key("loss") == "train/loss"


def test_a_new_experiment_is_typed_as_machine_learning_and_a_set_kind_is_kept(store: mlflow.MlflowClient) -> None:
    experiment_id = use_experiment("fresh")
    assert mlflow.get_experiment_by_name("fresh").experiment_id == experiment_id
    assert EXPERIMENT_KIND == "custom_model_development"  # MLflow 3's "Machine learning" kind
    assert store.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert use_experiment("fresh") == experiment_id  # an existing experiment is reused
    store.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "genai_development")  # a person's choice
    use_experiment("fresh")
    assert store.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_in_run_attaches_to_a_run_and_leaves_it_running(store: mlflow.MlflowClient) -> None:
    run_id = store.create_run(mlflow.get_experiment_by_name("t").experiment_id).info.run_id
    with in_run(run_id) as run:
        assert run.info.run_id == run_id
        mlflow.log_metric("m", 1.0)
        with in_run(run_id) as same:  # already active: reused, not restarted
            assert same.info.run_id == run_id
    assert mlflow.active_run() is None
    assert store.get_run(run_id).info.status == "RUNNING" and store.get_run(run_id).data.metrics["m"] == 1.0


def test_epoch_logger_logs_every_epoch_under_its_prefix(store: mlflow.MlflowClient) -> None:
    with mlflow.start_run() as run:
        logger = MlflowEpochLogger("member2/")
        for epoch, (loss, auc) in enumerate([(0.7, 0.6), (0.5, 0.8)]):
            logger.on_epoch_end(epoch, {"loss": loss, "val_auc": auc})
    history = store.get_metric_history(run.info.run_id, "member2/val/auc")
    assert [(m.step, m.value) for m in history] == [(0, 0.6), (1, 0.8)]
    assert store.get_metric_history(run.info.run_id, "member2/train/loss")[-1].value == 0.5


def test_log_figure_uploads_the_png_it_returns(store: mlflow.MlflowClient, tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    with mlflow.start_run() as run:
        png = log_figure(fig, "plots/line.png")
    saved = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="plots/line.png",
                                                     dst_path=str(tmp_path / "dl")))
    assert png.startswith(b"\x89PNG") and saved.read_bytes() == png


def test_record_config_logs_every_field_and_the_typed_config(store: mlflow.MlflowClient) -> None:
    cfg = load_config("smoke", seed=7)
    with mlflow.start_run() as run:
        record_config.fn(cfg, run.info.run_id)
    params = store.get_run(run.info.run_id).data.params
    assert params["cfg/seed"] == "7" and {f"cfg/{k}" for k in type(cfg).model_fields} <= set(params)
    config = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/config.json")
    assert type(cfg).model_validate({**config, "work_dir": cfg.work_dir}) == cfg


def test_io_tasks_retry_a_server_failure_but_not_a_users_mistake() -> None:
    from prefect.states import Completed, Failed

    assert retry_on_io(None, None, Failed(data=ConnectionError("reset"))) is True
    assert retry_on_io(None, None, Failed(data=DataError("no such folder"))) is False
    assert retry_on_io(None, None, Completed(data=1)) is False


def test_visualize_logs_the_three_data_figures(store: mlflow.MlflowClient, synthetic_dataset: Path,
                                                tmp_path: Path) -> None:
    cfg = load_config("smoke", data_dir=synthetic_dataset, image_size=32, work_dir=tmp_path / "work")
    _, manifest, digest = index_and_split(cfg)
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    decoded_images(manifest, cfg.image_size, cfg.cache_dir)
    with mlflow.start_run() as run:
        names = visualize.fn(cfg, DataHandle(manifest_path=str(tmp_path / "manifest.csv"), digest=digest),
                             run.info.run_id, per_class=2)
    logged = {a.path for a in store.list_artifacts(run.info.run_id, "plots")}
    assert set(names) == logged == {"plots/class_counts.png", "plots/sample_images.png", "plots/augmentations.png"}
    sample = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="plots/sample_images.png",
                                                 dst_path=str(tmp_path / "dl"))
    assert Image.open(sample).size[0] > 200  # a real figure, not an empty file


EVALUATION = Evaluation(
    threshold=0.6123,
    val={"accuracy": 0.95, "precision": 0.97, "sensitivity": 0.96, "specificity": 0.93, "f1": 0.965,
         "roc_auc": 0.991, "pr_auc": 0.995, "brier": 0.03, "ece": 0.02},
    test={"accuracy": 0.91, "precision": 0.89, "sensitivity": 0.98, "specificity": 0.79, "f1": 0.93,
          "roc_auc": 0.97, "pr_auc": 0.98, "brier": 0.1, "ece": 0.15},
    val_stressed={"blur": {"sensitivity": 0.9, "specificity": 0.8, "roc_auc": 0.95}},
)


def test_the_evaluation_summary_carries_the_threshold_both_splits_and_the_stresses() -> None:
    cfg = load_config("default")
    rules = {"margin": {"balanced_accuracy": 0.94, "threshold_logit_sd": 0.3}}
    text = summary_markdown(cfg, EVALUATION, "REPORT", rules)
    assert "Threshold **0.6123**, chosen on validation by the `stressed_margin` rule" in text
    assert "| accuracy | 0.9500 | 0.9100 |" in text and "| specificity | 0.9300 | 0.7900 |" in text
    assert "| blur | 0.900 | 0.800 | 0.9500 |" in text and "| margin | 0.9400 | 0.300 |" in text
    assert f"over {len(cfg.views)} test-time view(s)" in text and text.rstrip().endswith("REPORT\n```")


def test_the_model_card_states_input_threshold_numbers_and_limits() -> None:
    cfg = load_config("default", seed=3)
    card = model_card(cfg, EVALUATION, "abcdef0123456789", "run42")
    assert "seed 3" in card and "run `run42`" in card and "`abcdef012345`" in card
    assert "resized to 96 px" in card and "threshold 0.6123" in card
    assert "| roc_auc | 0.9910 | 0.9700 |" in card and "| specificity | 0.9300 | 0.7900 |" in card
    assert "Research use only" in card and "nan" not in card.lower()  # a wrong metric key would read NaN


def test_the_model_cards_first_line_is_the_headline_the_version_list_can_show() -> None:
    headline = model_card(load_config("default"), EVALUATION, "abcdef0123456789", "run42").split("\n")[0]
    assert headline == "acc 0.910, AUC 0.970 @ 0.61"  # test accuracy, test ROC AUC, threshold
    assert len(headline) <= CARD_HEADLINE_CHARS
    worst = EVALUATION.model_copy(update=dict(threshold=1.0, test={**EVALUATION.test, "accuracy": 1.0, "roc_auc": 1.0}))
    widest = model_card(load_config("default"), worst, "abcdef0123456789", "run42").split("\n")[0]
    assert len(widest) <= CARD_HEADLINE_CHARS


@pytest.mark.slow
def test_a_crashed_flows_run_and_its_running_trials_are_closed_and_live_ones_kept(store: mlflow.MlflowClient) -> None:
    """A worker killed mid-flow leaves its MLflow run RUNNING; the next flow closes it once Prefect says the flow run
    crashed, and an earlier attempt of its own flow run, and leaves alone a flow still running and one Prefect does
    not know."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed, Running
    from prefect.testing.utilities import prefect_test_harness

    @flow(name="cxr-pneumonia-train")
    def pipeline() -> None:
        pass

    experiment_id = mlflow.get_experiment_by_name("t").experiment_id

    def pipeline_run(flow_run_id: str) -> str:
        tags = {"cxr.role": "pipeline", "prefect.flow_run_id": flow_run_id, "prefect.flow_run_name": "brave-fox"}
        return store.create_run(experiment_id, tags=tags).info.run_id

    with prefect_test_harness(server_startup_timeout=120), get_client(sync_client=True) as prefect:
        crashed, live, this = (str(prefect.create_flow_run(pipeline, state=Running()).id) for _ in range(3))
        prefect.set_flow_run_state(crashed, Crashed(message="No heartbeat"), force=True)
        killed, running, unknown, attempt = (pipeline_run(i) for i in (crashed, live, str(uuid.uuid4()), this))
        trial = store.create_run(experiment_id, tags={"mlflow.parentRunId": killed, "cxr.role": "trial"}).info.run_id
        done = store.create_run(experiment_id, tags={"mlflow.parentRunId": killed, "cxr.role": "trial"}).info.run_id
        store.set_terminated(done, "FINISHED")
        assert sorted(close_crashed_runs.fn(experiment_id, this)) == sorted([killed, attempt])
    status = {r: store.get_run(r).info.status for r in (killed, trial, done, running, unknown, attempt)}
    assert status == {killed: "FAILED", trial: "FAILED", done: "FINISHED", running: "RUNNING", unknown: "RUNNING",
                      attempt: "FAILED"}
    assert store.get_run(trial).data.tags["cxr.failure"] == "its Prefect flow run brave-fox ended CRASHED"
    assert close_crashed_runs.fn(experiment_id, this) == []  # nothing is left to close
