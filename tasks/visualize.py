"""Visualization task: class counts, sample images and augmentations, to MLflow and Prefect."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from prefect import task
from prefect.cache_policies import NONE

from cxr_model import plots
from cxr_model.augmentation import build_augmentation
from cxr_model.config import TrainConfig
from cxr_model.data import split_rows
from cxr_pneumonia.tasks.data import DataHandle, open_data
from cxr_pneumonia.tasks.tracking import in_run, log_figure, png_markdown, publish_markdown


@task(name="visualize", cache_policy=NONE)
def visualize(cfg: TrainConfig, data: DataHandle, run_id: str, per_class: int = 8) -> list[str]:
    """Log the three data figures as PNG artifacts; return their artifact paths."""
    manifest, images = open_data(cfg, data)
    rng = np.random.default_rng(cfg.seed)
    train = split_rows(manifest, "train")
    picks = train.groupby("label", group_keys=False).apply(
        lambda g: g.iloc[rng.permutation(len(g))[:per_class]]
    ).reset_index(drop=True)
    samples = images.take(picks)
    augment = build_augmentation(**cfg.augmentation_params())
    one = np.repeat(samples[:1].astype("float32"), 11, axis=0)  # (11, S, S, 1)
    augmented = np.clip(np.asarray(augment(tf.constant(one), training=True)), 0, 255)
    figures = {
        "plots/class_counts.png": plots.class_counts(manifest),
        "plots/sample_images.png": plots.image_grid(
            samples, [f"{r.class_name}\n{r.patient_id}" for r in picks.itertuples()],
            columns=per_class, title="Random training images (top: NORMAL, bottom: PNEUMONIA)",
        ),
        "plots/augmentations.png": plots.image_grid(
            np.concatenate([samples[:1], augmented]), ["original"] + [f"augmented {i}" for i in range(1, 12)],
            columns=6, title=f"Training augmentation of {picks.iloc[0]['patient_id']}",
        ),
    }
    markdown = []
    with in_run(run_id):
        for name, fig in figures.items():
            markdown.append(png_markdown(name, log_figure(fig, name)))
    publish_markdown("data-figures", "\n".join(markdown), "Class counts, sample images and augmentations")
    return list(figures)
