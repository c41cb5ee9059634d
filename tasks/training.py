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
from cxr_model.model import build_convnet, count_flops, mean_ensemble
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
    """Fit on train, stop and reduce the learning rate on validation, save the mean of the kept weights.

    The network is trained `cfg.members` times, member i with seed `cfg.seed + i - 1` (initialisation, shuffling
    and augmentation) and an equal share of `cfg.train_minutes`; each keeps its `cfg.snapshots` best epochs, and
    the saved model averages the predictions of all of them (`mean_ensemble`). Member 1 logs its epochs under
    train/ and val/, member i > 1 under member<i>/train/ and member<i>/val/.
    """
    manifest, images = open_data(cfg, data)
    train, val = (manifest[manifest["split"] == s] for s in ("train", "val"))
    model_cfg = config_from_hparams(hparams, cfg.image_size, SearchSpace(**cfg.search_space_params()))
    budget = cfg.train_minutes / cfg.members if cfg.train_minutes else None
    weights, kept_epochs, epochs, by_budget = [], [], 0, False

    with in_run(run_id):
        mlflow.log_params({f"model/{k}": v for k, v in model_cfg.to_dict().items()})
        started = time.perf_counter()
        for member in range(1, cfg.members + 1):
            member_cfg = cfg.model_copy(update=dict(seed=cfg.seed + member - 1, train_minutes=budget))
            keras.utils.set_random_seed(member_cfg.seed)
            model = build_convnet(model_cfg)
            if member == 1:  # of one member network: the ensemble predicts at `cfg.members * cfg.snapshots` times it
                mlflow.log_params({"model/parameters": model.count_params(),
                                   "model/flops_per_image": count_flops(model_cfg)})
            prefix = "" if member == 1 else f"member{member}/"
            history = fit_recipe(model, member_cfg, images.take(train), train["label"].to_numpy(), images.take(val),
                                 val["label"].to_numpy(), callbacks=[MlflowEpochLogger(prefix)], verbose=2)
            trained = len(history.history["loss"])
            epochs += trained
            by_budget |= history.stopped_by_budget
            # no finite val AUC at all (a degenerate validation split): keep the weights training ended on
            weights += history.snapshots.weights or [model.get_weights()]
            kept_epochs.append(",".join(map(str, history.snapshots.epochs)) or str(trained))
            name = "learning_curves.png" if member == 1 else f"learning_curves_member{member}.png"
            log_figure(plots.learning_curves(history.history), f"plots/{name}")
        seconds = time.perf_counter() - started
        mlflow.log_metrics({"train/seconds": seconds, "train/epochs": float(epochs),
                            "train/stopped_by_budget": float(by_budget),
                            "train/images_per_second": len(train) * epochs / max(seconds, 1e-9)})
        # the kept epochs of each member, members separated by ';' (e.g. '7' or '7,5;9,8')
        mlflow.log_params({"train/snapshot_epochs": ";".join(kept_epochs), "model/networks_averaged": len(weights)})
    model = mean_ensemble(model_cfg, weights)
    out = cfg.output_dir / run_id
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.keras"
    model.save(model_path)
    return TrainedModel(model_path=str(model_path.resolve()), convnet=model_cfg.to_dict(), epochs_trained=epochs)
