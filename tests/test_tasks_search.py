"""The search's pipelines and state lock, on synthetic images (Prefect and MLflow imported, no flow or run started)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pandas as pd
import pytest

import cxr_model.search
import cxr_pneumonia.tasks.search
from cxr_model.cache import DecodedImages
from cxr_model.config import load_config
from cxr_model.pipelines import recipe_datasets
from cxr_pneumonia.tasks.data import DataHandle


class _Built(Exception):
    """Stops the search once its pipelines exist."""


def test_search_trials_train_without_mixup_but_with_the_class_weights(monkeypatch) -> None:
    keys = [f"k{i}" for i in range(40)]
    manifest = pd.DataFrame(dict(sha256=keys, label=(np.arange(40) >= 10).astype(int),
                                 split=["train"] * 32 + ["val"] * 8))
    images = DecodedImages(keys, np.random.default_rng(0).integers(0, 256, (40, 32, 32, 1)).astype("uint8"))
    monkeypatch.setattr(cxr_pneumonia.tasks.search, "open_data", lambda cfg, data: (manifest, images))
    built = {}

    def spy(cfg, *arrays):
        built["train"], _ = recipe_datasets(cfg, *arrays)
        raise _Built

    monkeypatch.setattr(cxr_model.search, "recipe_datasets", spy)
    cfg = load_config("smoke", image_size=32, mixup=0.4, search_fraction=1.0, augment=False, class_weights=True)
    with pytest.raises(_Built):
        cxr_pneumonia.tasks.search.search.fn(cfg, DataHandle(manifest_path="unused", digest="d"), run_id="unused")
    batches = list(built["train"])  # one pass: each pass reshuffles
    labels, weights = (np.concatenate([b[i].numpy() for b in batches]) for i in (1, 2))
    assert set(np.unique(labels)) == {0.0, 1.0}  # hard labels: no image was blended
    assert len(np.unique(weights)) == 2 and weights[labels == 0].min() > weights[labels == 1].max()  # class weights


def test_state_lock_lets_one_flow_at_a_time_use_a_search_state_folder(tmp_path, capsys) -> None:
    """The second flow on the same state folder waits for the first (and says so); another folder does not."""
    state = tmp_path / "tuner" / "random-abc-96px-key"
    spans: dict[str, tuple[float, float]] = {}

    def flow(name: str, folder, hold: float) -> None:
        with cxr_model.search.state_lock(folder):
            start = time.monotonic()
            time.sleep(hold)
            spans[name] = (start, time.monotonic())

    threads = [threading.Thread(target=flow, args=("first", state, 1.0)),
               threading.Thread(target=flow, args=("same", state, 0.1)),
               threading.Thread(target=flow, args=("other", state.with_name("random-abc-96px-other"), 0.1))]
    threads[0].start()
    time.sleep(0.3)  # the first holds the lock
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert spans["same"][0] >= spans["first"][1]  # waited for the first to finish
    assert spans["other"][0] < spans["first"][1]  # another folder is not held up
    out = capsys.readouterr().out
    assert f"Another flow (pid {os.getpid()}) is searching with the same data and settings in {state}" in out
    assert out.count("Another flow") == 1


def test_state_lock_without_file_locks_says_so_and_goes_on(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(cxr_model.search, "fcntl", None)
    ran = []
    with cxr_model.search.state_lock(tmp_path / "tuner" / "x"):
        ran.append(True)
    assert ran == [True] and "is not locked against other flows" in capsys.readouterr().out
