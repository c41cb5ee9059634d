"""Shared fixtures: synthetic image folders for unit tests, a real-data subset and one smoke flow run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SPLITS, CLASSES = ("train", "test"), ("NORMAL", "PNEUMONIA")


DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "chest_xray"
DATA_MISSING = "real dataset not found"  # opens the skip reason; the end-of-run line counts the tests by it


def real_data_dir() -> Path | None:
    """The real dataset: CXR_DATA_DIR if set (and then only it), else ../shared/data/chest_xray beside the checkout."""
    configured = os.environ.get("CXR_DATA_DIR")
    candidate = Path(configured) if configured else DEFAULT_DATA_DIR
    return candidate if (candidate / "train" / "NORMAL").is_dir() else None


def in_ci() -> bool:
    """CI=true (or any value but false/0): there a missing dataset fails instead of skipping."""
    return os.environ.get("CI", "").strip().lower() not in ("", "false", "0", "no")


def how_to_point_at_the_data() -> str:
    configured = os.environ.get("CXR_DATA_DIR")
    where = (f"CXR_DATA_DIR={configured} has no train/NORMAL folder" if configured
             else f"CXR_DATA_DIR is not set and nothing is at {DEFAULT_DATA_DIR}")
    return f"{where}; point it at the folder holding train/ and test/: `CXR_DATA_DIR=/path/to/chest_xray make test`"


class MissingDataSummary:
    """Ends the run with one line when tests were skipped (or, in CI, failed) for want of the real dataset."""

    def __init__(self, config: pytest.Config):
        self.config, self.nodeids = config, []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "setup" and not report.passed and DATA_MISSING in str(report.longrepr):
            self.nodeids.append(report.nodeid)

    # tryfirst makes this the outermost wrapper, so the line comes after pytest's own "N passed, M skipped" line
    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int):
        result = yield
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if self.nodeids and reporter is not None:
            verdict = "failed (CI=true: the data must be there)" if in_ci() else "skipped"
            reporter.write_line(f"{len(self.nodeids)} integration tests {verdict}, {DATA_MISSING}: "
                                f"{how_to_point_at_the_data()}", yellow=not in_ci(), red=in_ci(), bold=True)
        return result


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(MissingDataSummary(config), "cxr-missing-data-summary")


def write_xray(path: Path, seed: int, size: tuple[int, int] = (40, 32), mode: str = "L") -> Path:
    """A small synthetic 'X-ray': noise plus a bright blob whose side depends on the seed."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    arr = rng.integers(0, 80, (h, w)).astype(np.uint8)
    arr[h // 4 : 3 * h // 4, (seed % 2) * w // 2 : (seed % 2) * w // 2 + w // 2] += 120
    img = Image.fromarray(arr, "L")
    if mode != "L":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def synthetic_dataset(tmp_path: Path) -> Path:
    """Kaggle layout with 3 patients x 2 images per class in train and 2 images per class in test."""
    root = tmp_path / "chest_xray"
    seed = 0
    for split in SPLITS:
        for label, cls in enumerate(CLASSES):
            for patient in range(3 if split == "train" else 1):
                for image in range(2):
                    seed += 1
                    name = (f"person{patient + 10 * label}_bacteria_{image}.jpeg" if cls == "PNEUMONIA"
                            else f"IM-{patient:04d}-{image:04d}.jpeg")
                    write_xray(root / split / cls / name, seed * 2 + label)
    return root


@pytest.fixture(scope="session")
def real_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small copy (temporary, never committed) of the real dataset: 24 images per split and class."""
    source = real_data_dir()
    if source is None:
        reason = f"{DATA_MISSING}: {how_to_point_at_the_data()}"
        if in_ci():  # CI has the data beside the clone: a skip there would hide a broken suite
            pytest.fail(reason)
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("real") / "chest_xray"
    for split in SPLITS:
        for cls in CLASSES:
            files = sorted((source / split / cls).glob("*.jpeg"))
            # evenly spaced files spread the subset over many patients
            for f in files[:: max(1, len(files) // 24)][:24]:
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, root / split / cls / f.name)
    return root


@dataclass
class FlowRun:
    """One `cxr train` run in its own folder, with its own MLflow store and Prefect home."""

    cwd: Path
    tracking_uri: str
    env: dict
    stdout: str
    result: dict  # what `cxr train --result-json` wrote: run id, test metrics, registered version
    stderr: str = ""  # Prefect's log of the flow and its tasks (prints included)


def start_cxr_train(cwd: Path, data_dir: Path, *extra: str, env: dict | None = None,
                    tracking_uri: str | None = None) -> tuple[subprocess.Popen, Callable[[], FlowRun]]:
    """`cxr train --profile smoke` started in `cwd` (its own sqlite store there unless `tracking_uri` names
    another), its output in files there; returns the process and a function that waits for it and reads the run."""
    cwd.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri or f"sqlite:///{cwd / 'mlflow.db'}"
    env = dict(env or os.environ)
    env.update(MLFLOW_TRACKING_URI=tracking_uri, PREFECT_HOME=str(cwd / "prefect-home"),
               CXR_WORK_DIR=str(cwd / "work"), PYTHONUNBUFFERED="1")
    env.pop("PREFECT_API_URL", None)
    n = len(list(cwd.glob("result-*.json")))
    result_path, out_path, err_path = (cwd / f"{kind}-{n}.{ext}" for kind, ext in
                                       (("result", "json"), ("stdout", "log"), ("stderr", "log")))
    cmd = [sys.executable, "-m", "cxr_pneumonia.cli", "train", "--profile", "smoke", "--data-dir", str(data_dir),
           "--result-json", str(result_path), *extra]
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)

    def finish(timeout: float = 900) -> FlowRun:
        try:
            proc.wait(timeout=timeout)
        finally:
            proc.kill()
        stdout, stderr = out_path.read_text(), err_path.read_text()
        if proc.returncode != 0:
            raise AssertionError(f"cxr train failed ({proc.returncode}):\n{stdout[-4000:]}\n{stderr[-8000:]}")
        return FlowRun(cwd=cwd, tracking_uri=tracking_uri, env=env, stdout=stdout,
                       result=json.loads(result_path.read_text()), stderr=stderr)

    return proc, finish


def run_cxr_train(cwd: Path, data_dir: Path, *extra: str, env: dict | None = None,
                  tracking_uri: str | None = None) -> FlowRun:
    """`cxr train --profile smoke` in `cwd`, to the end; its own sqlite store there unless `tracking_uri` names
    another."""
    return start_cxr_train(cwd, data_dir, *extra, env=env, tracking_uri=tracking_uri)[1]()


@pytest.fixture(scope="session")
def smoke_flow(tmp_path_factory: pytest.TempPathFactory, real_subset: Path) -> FlowRun:
    """The whole flow, smoke profile, on the real subset; shared by the integration and serving tests."""
    return run_cxr_train(tmp_path_factory.mktemp("flow"), real_subset)

