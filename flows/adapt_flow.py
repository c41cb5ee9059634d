"""The adaptation flow: load a registered version -> adapt it to a site's unlabeled films -> register the result."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from cxr_model.adapt import DEFAULT_SETTINGS, AdaptSettings
from cxr_model.config import work_dir_from_environment
from cxr_model.runtime import configure_threads
from cxr_pneumonia.tasks.adapt import adapt_to_site, load_parent, register_adapted


@flow(name="cxr-pneumonia-adapt", log_prints=True)
def adapt_flow(model_uri: str, images: Path, name: str | None = None, alias: str | None = None,
               settings: AdaptSettings = DEFAULT_SETTINGS, work_dir: Path | None = None,
               threads: int | None = None) -> dict:
    """Register a version of `model_uri` adapted to the films under `images`; {"refused": reason} on a refusal,
    with nothing registered."""
    configure_threads(threads)
    work_dir = work_dir or work_dir_from_environment()
    parent = load_parent(model_uri, work_dir)
    adapted = adapt_to_site(parent, images, settings, work_dir)
    if adapted.refused:
        return {"refused": adapted.refused}
    return register_adapted(parent, adapted, images, name, alias)
