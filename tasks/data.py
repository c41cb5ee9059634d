"""Loading task: index the folder, split by patient, warm the decoded-image cache, record the data."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel

from cxr_model.cache import DecodedImages, decoded_images
from cxr_model.config import TrainConfig
from cxr_model.data import SPLITS, cross_split_duplicates, index_and_split, split_rows
from cxr_pneumonia.tasks.tracking import in_run


class DataHandle(BaseModel):
    """What later tasks need to find the data again: a manifest file and its digest."""

    manifest_path: str
    digest: str


def read_manifest(handle: DataHandle) -> pd.DataFrame:
    return pd.read_csv(handle.manifest_path)


def open_data(cfg: TrainConfig, handle: DataHandle) -> tuple[pd.DataFrame, DecodedImages]:
    """The manifest and its decoded-image cache (already warm after `load_data`); `split_rows` picks a split."""
    manifest = read_manifest(handle)
    return manifest, decoded_images(manifest, cfg.image_size, cfg.cache_dir)


def _log_split_inputs(manifest: pd.DataFrame, source: str, digest: str) -> None:
    for split in SPLITS:
        part = split_rows(manifest, split).reset_index(drop=True)
        dataset = mlflow.data.from_pandas(
            part, source=source, targets="label", name=f"chest_xray-{split}", digest=f"{digest}-{split}"
        )
        mlflow.log_input(dataset, context=split)


@task(name="load-data", cache_policy=NONE)
def load_data(cfg: TrainConfig, run_id: str) -> DataHandle:
    """Index, split and cache the dataset; log counts, skipped files, duplicates and the manifest."""
    root = cfg.resolved_data_dir()
    indexed, manifest, digest = index_and_split(cfg)
    dupes = cross_split_duplicates(manifest)
    decoded_images(manifest, cfg.image_size, cfg.cache_dir)  # decode once; every later task hits the cache

    out = cfg.output_dir / run_id
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.csv"
    manifest.to_csv(manifest_path, index=False)
    with in_run(run_id):
        mlflow.set_tag("data_digest", digest)
        counts = manifest.groupby(["split", "class_name"]).size()
        mlflow.log_params({f"data/{s}_{c.lower()}": int(n) for (s, c), n in counts.items()})
        mlflow.log_params({"data/skipped_files": len(indexed.skipped), "data/cross_split_duplicates": len(dupes)})
        for frame, name in ((manifest, "manifest.csv"), (indexed.skipped, "skipped_files.csv"),
                            (dupes, "cross_split_duplicates.csv")):
            frame.to_csv(out / name, index=False)
            mlflow.log_artifact(str(out / name), artifact_path="data")
        _log_split_inputs(manifest, str(root), digest)
    print(f"Indexed {len(manifest)} images from {root} ({len(indexed.skipped)} skipped, "
          f"{len(dupes)} cross-split duplicate files); digest {digest}")
    return DataHandle(manifest_path=str(Path(manifest_path).resolve()), digest=digest)
