"""Benchmarks stop on a known failure with one line, and on anything else with the traceback."""

from __future__ import annotations

import subprocess

import pytest
from mlflow.exceptions import MlflowException

from benchmarks.errors import run_main
from cxr_model.errors import DataError


@pytest.mark.parametrize(("failure", "line"), [
    (DataError("Dataset folder /nowhere does not exist."), "error: Dataset folder /nowhere does not exist."),
    (MlflowException("Registered Model with name=nosuch not found"),
     "error: Registered Model with name=nosuch not found"),
    (subprocess.CalledProcessError(2, ["python", "-m", "cxr_pneumonia.cli", "train", "--seed", "3"]),
     "error: python -m cxr_pneumonia.cli train --seed 3 failed with exit status 2 (its own message is above)"),
])
def test_known_failures_end_in_one_line(failure: Exception, line: str) -> None:
    def main() -> None:
        raise failure

    with pytest.raises(SystemExit) as stopped:
        run_main(main)
    assert stopped.value.code == line


def test_other_failures_keep_their_traceback() -> None:
    def main() -> None:
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        run_main(main)
