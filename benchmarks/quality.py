"""Quality benchmark: run the flow N times (seeds F..F+N-1) and summarise every test metric.

    python benchmarks/quality.py --profile default --seeds 3 [--first-seed 3] [--out quality-default.json]

Runs log to the configured MLflow store (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db) under the
experiment `cxr-quality-<profile>` and register `cxr-pneumonia-bench`, so the real registry is untouched.
Writes benchmarks/results/quality-<profile>.json (`--out`): per seed the test metrics, wall minutes and the
flow's peak resident memory (its largest process). Each run reads the test split once, after its own
validation-made choices; comparing profiles here is reporting, not tuning. A new recipe is best read on seeds
no earlier run used (`--first-seed`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS = ("accuracy", "precision", "sensitivity", "specificity", "f1", "roc_auc", "pr_auc")


def timed_run(cmd: list[str], cwd: Path, env: dict | None = None, quiet: bool = False) -> tuple[float, float]:
    """Run `cmd` to the end: (wall minutes, the process's own peak resident memory in GiB).

    Raises CalledProcessError on failure. Each call measures its own child (`os.wait4`), so runs one after
    another do not inherit each other's peak as `RUSAGE_CHILDREN` would.
    """
    started = time.perf_counter()
    out = subprocess.DEVNULL if quiet else None
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=out) as proc:  # killed with this script
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return (time.perf_counter() - started) / 60, usage.ru_maxrss / 2**20


def ensure_experiment(name: str, tracking_uri: str | None = None) -> None:
    """Create `name` with its artifacts beside a local SQLite store (`<store folder>/mlruns`) if it does not exist.

    MLflow fixes an experiment's artifact root when the experiment is created, and a flow that creates it puts
    it under its working folder; for a benchmark run from a scratch clone, the artifacts would vanish with the
    clone. A tracking server decides for itself, so only `sqlite:` stores are touched.
    """
    from mlflow import MlflowClient

    from cxr_pneumonia.cli import DEFAULT_TRACKING_URI  # what `cxr train` falls back to

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    if not uri.startswith("sqlite:///"):
        return

    store = (HERE.parent / uri.removeprefix("sqlite:///")).resolve()  # the flows run in the repository root
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=(store.parent / "mlruns").as_uri())


def run_once(profile: str, seed: int, data_dir: str | None, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "cxr_pneumonia.cli", "train", "--profile", profile, "--seed", str(seed),
               "--experiment-name", f"cxr-quality-{profile}", "--model-name", "cxr-pneumonia-bench",
               "--result-json", str(out), *(["--data-dir", data_dir] if data_dir else []), *extra]
        minutes, peak_gib = timed_run(cmd, HERE.parent)
        result = json.loads(out.read_text())
    return dict(seed=seed, minutes=minutes, peak_memory_gib=peak_gib, run_id=result["run_id"],
                threshold=result["threshold"], **{m: result["test"][m] for m in METRICS})


def summarise(runs: list[dict]) -> dict:
    keys = (*METRICS, "minutes", "peak_memory_gib")
    return {k: dict(mean=statistics.mean(r[k] for r in runs),
                    sd=statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--out", help="file name under benchmarks/results/ (default quality-<profile>.json)")
    parser.add_argument("--data-dir", default=os.environ.get("CXR_DATA_DIR"))
    parser.add_argument("extra", nargs="*", help="more `cxr train` options after --")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    out = HERE / "results" / (args.out or f"quality-{args.profile}.json")
    out.parent.mkdir(exist_ok=True)
    ensure_experiment(f"cxr-quality-{args.profile}")
    runs: list[dict] = []
    for seed in seeds:  # the file is rewritten after every seed, so a stopped benchmark keeps what it measured
        runs.append(run_once(args.profile, seed, args.data_dir, args.extra))
        summary = summarise(runs)
        out.write_text(json.dumps(dict(profile=args.profile, extra=args.extra, runs=runs, summary=summary), indent=2))
    print(f"{'metric':12s} {'mean':>7s} {'sd':>7s}  " + " ".join(f"seed{r['seed']:<3d}" for r in runs))
    for k, v in summary.items():
        print(f"{k:12s} {v['mean']:7.4f} {v['sd']:7.4f}  " + " ".join(f"{r[k]:7.4f}" for r in runs))
    print(f"wrote {out}")


if __name__ == "__main__":
    from errors import run_main

    run_main(main)
