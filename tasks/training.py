"""Training task: retrain the best hyperparameters with augmentation and early stopping, and average the networks."""

from __future__ import annotations

import time

import mlflow
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel

from cxr_model import plots
from cxr_model.config import TrainConfig
from cxr_model.data import split_rows
from cxr_model.fitting import fit_networks
from cxr_model.model import count_flops
from cxr_model.search import SearchSpace, config_from_hparams
from cxr_pneumonia.tasks.data import DataHandle, open_data
from cxr_pneumonia.tasks.tracking import MlflowEpochLogger, in_run, log_figure


class TrainedModel(BaseModel):
    """Where the trained Keras model lives and what it was built from."""

    model_path: str
    convnets: list[dict]  # ConvNetConfig fields of each architecture trained (one per top trial), best first
    epochs_trained: int


@task(name="train", cache_policy=NONE)
def train_model(cfg: TrainConfig, data: DataHandle, top_hparams: list[dict], run_id: str) -> TrainedModel:
    """Fit on train, stop and reduce the learning rate on validation, save the mean of the kept weights.

    Each architecture in `top_hparams` (the best search trials, best first) is trained `cfg.members` times: network
    n = 1, 2, ... (architecture by architecture) with seed `cfg.seed + n - 1` (initialisation, shuffling and
    augmentation) and an equal share of `cfg.train_minutes`; each keeps its `cfg.snapshots` best epochs, and the
    saved model averages the predictions of all of them (`mean_ensemble`). Network 1 logs its epochs under train/
    and val/, network n > 1 under member<n>/train/ and member<n>/val/. Architecture 1's fields are logged under
    model/, architecture a > 1's under model<a>/.
    """
    if not top_hparams:
        raise ValueError("train_model needs the hyperparameters of at least one search trial")
    manifest, images = open_data(cfg, data)
    train, val = (split_rows(manifest, s) for s in ("train", "val"))
    space = SearchSpace.from_config(cfg)
    architectures = [config_from_hparams(hparams, cfg.image_size, space) for hparams in top_hparams]
    networks = [arch for arch in architectures for _ in range(cfg.members)]  # (architecture, member) in order

    with in_run(run_id):
        for a, arch in enumerate(architectures, start=1):
            prefix = "model" if a == 1 else f"model{a}"
            mlflow.log_params({f"{prefix}/{k}": v for k, v in arch.to_dict().items()})
        started = time.perf_counter()
        fitted = fit_networks(networks, cfg, images.take(train), train["label"].to_numpy(), images.take(val),
                              val["label"].to_numpy(), verbose=2,
                              callbacks=lambda n: [MlflowEpochLogger("" if n == 1 else f"member{n}/")])
        seconds = time.perf_counter() - started
        epochs = sum(fitted.epochs)
        for n, history in enumerate(fitted.histories, start=1):
            name = "learning_curves.png" if n == 1 else f"learning_curves_member{n}.png"
            log_figure(plots.learning_curves(history.history), f"plots/{name}")
        # of the best network; `model/ensemble_flops_per_image` is what the saved model spends
        mlflow.log_params({"model/parameters": fitted.histories[0].model.count_params(),
                           "model/flops_per_image": count_flops(fitted.histories[0].model)})
        mlflow.log_metrics({"train/seconds": seconds, "train/epochs": float(epochs),
                            "train/stopped_by_budget": float(fitted.stopped_by_budget),
                            "train/images_per_second": len(train) * epochs / max(seconds, 1e-9)})
        model = fitted.model()
        # the kept epochs of each network, networks separated by ';' (e.g. '7' or '7,5;9,8')
        kept_epochs = [",".join(map(str, h.snapshots.epochs)) or str(trained)
                       for h, trained in zip(fitted.histories, fitted.epochs, strict=True)]
        mlflow.log_params({"train/snapshot_epochs": ";".join(kept_epochs),
                           "model/networks_averaged": len(fitted.weights), "model/architectures": len(architectures),
                           "model/ensemble_flops_per_image": count_flops(model)})
    out = cfg.output_dir / run_id
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.keras"
    model.save(model_path)
    return TrainedModel(model_path=str(model_path.resolve()), convnets=[a.to_dict() for a in architectures],
                        epochs_trained=epochs)
