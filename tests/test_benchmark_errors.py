"""Benchmarks stop on a known failure with one line, and on anything else with the traceback."""

from __future__ import annotations

import subprocess

import pytest

from benchmarks.errors import run_main
from cxr_model.config import DataConfigError


def test_known_failures_end_in_one_line_and_others_keep_their_traceback() -> None:
    def no_data():
        raise DataConfigError("Dataset folder /nowhere does not exist.")

    with pytest.raises(SystemExit) as stopped:
        run_main(no_data)
    assert stopped.value.code == "error: Dataset folder /nowhere does not exist."

    def failed_flow():
        raise subprocess.CalledProcessError(2, ["python", "-m", "cxr_model.cli", "train", "--seed", "3"])

    with pytest.raises(SystemExit) as stopped:
        run_main(failed_flow)
    assert "cxr_model.cli train --seed 3 failed with exit status 2" in stopped.value.code

    from mlflow.exceptions import MlflowException

    def no_model():
        raise MlflowException("Registered Model with name=nosuch not found")

    with pytest.raises(SystemExit) as stopped:
        run_main(no_model)
    assert stopped.value.code == "error: Registered Model with name=nosuch not found"

    def bug():
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        run_main(bug)
