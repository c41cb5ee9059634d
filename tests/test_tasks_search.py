"""The search task's pipelines, on synthetic images (Prefect and MLflow imported, no flow or run started)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import tasks.data
import tasks.search
from cxr_model.cache import DecodedImages
from cxr_model.config import load_config
from cxr_model.train import recipe_datasets
from tasks.data import DataHandle


class _Built(Exception):
    """Stops the search once its pipelines exist."""


def test_search_trials_train_without_mixup_but_with_the_class_weights(monkeypatch) -> None:
    keys = [f"k{i}" for i in range(40)]
    manifest = pd.DataFrame(dict(sha256=keys, label=(np.arange(40) >= 10).astype(int),
                                 split=["train"] * 32 + ["val"] * 8))
    images = DecodedImages(keys, np.random.default_rng(0).integers(0, 256, (40, 32, 32, 1)).astype("uint8"))
    monkeypatch.setattr(tasks.search, "open_data", lambda cfg, data: (manifest, images))
    built = {}

    def spy(cfg, *arrays):
        built["train"], _ = recipe_datasets(cfg, *arrays)
        raise _Built

    monkeypatch.setattr(tasks.data, "recipe_datasets", spy)
    cfg = load_config("smoke", image_size=32, mixup=0.4, search_fraction=1.0, augment=False, class_weights=True)
    with pytest.raises(_Built):
        tasks.search.search.fn(cfg, DataHandle(manifest_path="unused", digest="d"), run_id="unused")
    batches = list(built["train"])  # one pass: each pass reshuffles
    labels, weights = (np.concatenate([b[i].numpy() for b in batches]) for i in (1, 2))
    assert set(np.unique(labels)) == {0.0, 1.0}  # hard labels: no image was blended
    assert len(np.unique(weights)) == 2 and weights[labels == 0].min() > weights[labels == 1].max()  # class weights
