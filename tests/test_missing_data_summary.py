"""Without the real dataset, a test run ends by saying in one line how many integration tests it skipped and how
to point at the data; in CI (CI=true) the same tests fail. Checked on a pytest run of its own, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, write_xray

TESTS = '''
import pytest

@pytest.mark.integration
def test_reads_the_data(real_subset):
    assert (real_subset / "train").is_dir()

@pytest.mark.integration
def test_reads_it_too(real_subset):
    assert real_subset

def test_needs_no_data():
    assert True
'''


def run_pytest(folder: Path, data_dir: Path, ci: str | None) -> subprocess.CompletedProcess:
    (folder / "conftest.py").write_text("from tests.conftest import pytest_configure, real_subset  # noqa: F401\n")
    (folder / "test_uses_data.py").write_text(TESTS)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env.update(CXR_DATA_DIR=str(data_dir), PYTHONPATH=str(REPO))
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-ra", "-p", "no:cacheprovider", "-W",
                           "ignore::pytest.PytestUnknownMarkWarning"], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("ci", [None, "false"])
def test_without_the_data_the_last_line_counts_the_skips_and_says_where_to_point(tmp_path: Path, ci) -> None:
    missing = tmp_path / "no-such-dataset"
    run = run_pytest(tmp_path, missing, ci)
    assert run.returncode == 0, run.stdout + run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("2 integration tests skipped, real dataset not found: "), run.stdout
    assert f"CXR_DATA_DIR={missing} has no train/NORMAL folder" in last and "CXR_DATA_DIR=/path/to/chest_xray" in last
    assert "1 passed, 2 skipped" in run.stdout.strip().splitlines()[-2]


def test_in_ci_a_missing_dataset_fails_the_run(tmp_path: Path) -> None:
    run = run_pytest(tmp_path, tmp_path / "no-such-dataset", "true")
    assert run.returncode != 0
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("2 integration tests failed (CI=true: the data must be there), real dataset not found")


def test_with_the_data_nothing_is_said(tmp_path: Path) -> None:
    data = tmp_path / "chest_xray"
    for split in ("train", "test"):
        for i, cls in enumerate(("NORMAL", "PNEUMONIA")):
            write_xray(data / split / cls / f"{cls}-{i}.jpeg", seed=i)
    (tmp_path / "run").mkdir()
    run = run_pytest(tmp_path / "run", data, "true")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 passed" in run.stdout and "integration tests" not in run.stdout
