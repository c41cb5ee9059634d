"""Training task: retrain the best hyperparameters with augmentation, class weights and early stopping."""

from __future__ import annotations

import time

import keras
import mlflow
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel

from cxr_model import plots
from cxr_model.config import TrainConfig
from cxr_model.model import build_convnet, count_flops, snapshot_ensemble
from cxr_model.search import SearchSpace, config_from_hparams
from cxr_model.train import fit_recipe
from tasks.data import DataHandle, open_data
from tasks.tracking import MlflowEpochLogger, in_run, log_figure


class TrainedModel(BaseModel):
    """Where the trained Keras model lives and what it was built from."""

    model_path: str
    convnet: dict  # ConvNetConfig fields
    epochs_trained: int


@task(name="train", cache_policy=NONE)
def train_model(cfg: TrainConfig, data: DataHandle, hparams: dict, run_id: str) -> TrainedModel:
    """Fit on train, stop and reduce the learning rate on validation, save the best epochs' snapshot ensemble."""
    keras.utils.set_random_seed(cfg.seed)
    manifest, images = open_data(cfg, data)
    train, val = (manifest[manifest["split"] == s] for s in ("train", "val"))
    model_cfg = config_from_hparams(hparams, cfg.image_size, SearchSpace(**cfg.search_space_params()))
    model = build_convnet(model_cfg)

    with in_run(run_id):
        mlflow.log_params({f"model/{k}": v for k, v in model_cfg.to_dict().items()})
        mlflow.log_params({"model/parameters": model.count_params(), "model/flops_per_image": count_flops(model_cfg)})
        started = time.perf_counter()
        history = fit_recipe(model, cfg, images.take(train), train["label"].to_numpy(), images.take(val),
                             val["label"].to_numpy(), callbacks=[MlflowEpochLogger()], verbose=2)
        seconds = time.perf_counter() - started
        epochs = len(history.history["loss"])
        mlflow.log_metrics({"train/seconds": seconds, "train/epochs": float(epochs),
                            "train/stopped_by_budget": float(history.stopped_by_budget),
                            "train/images_per_second": len(train) * epochs / max(seconds, 1e-9)})
        mlflow.log_params({"train/snapshot_epochs": ",".join(map(str, history.snapshots.epochs))})
        log_figure(plots.learning_curves(history.history), "plots/learning_curves.png")
    # no finite val AUC at all (a degenerate validation split): keep the weights training ended on
    model = snapshot_ensemble(model_cfg, history.snapshots.weights or [model.get_weights()])
    out = cfg.output_dir / run_id
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.keras"
    model.save(model_path)
    return TrainedModel(model_path=str(model_path.resolve()), convnet=model_cfg.to_dict(), epochs_trained=epochs)
