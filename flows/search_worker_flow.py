"""A distributed search's worker: join the chief's run, then run trials until the chief has no more."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from cxr_model.distributed import WORKER_WAIT_MINUTES
from cxr_pneumonia.tasks.search import join_search, run_worker_trials


@flow(name="cxr-pneumonia-search-worker", log_prints=True)
def search_worker_flow(data_dir: Path | None = None, work_dir: Path | None = None, threads: int | None = None,
                       run_id: str | None = None, wait_s: float = WORKER_WAIT_MINUTES * 60) -> dict:
    """The settings come from the chief's run (its `config.json`), so a worker cannot score trials with others."""
    chief = join_search(data_dir, work_dir, threads, run_id, wait_s)
    return run_worker_trials(chief)
