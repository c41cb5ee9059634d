"""Start and stop real `mlflow models serve` and `mlflow server` processes (tests, benchmarks, scripts)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cxr_model.errors import ServerError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_model_server(model_uri: str, log: Path, env: dict | None = None, cwd: Path | None = None,
                       timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """`mlflow models serve -m URI --env-manager local` on a free loopback port; returns once /ping answers."""
    return _start(["models", "serve", "-m", model_uri, "--env-manager", "local"], "/ping", "model server", log, env,
                  cwd, timeout)


def start_tracking_server(root: Path, log: Path, env: dict | None = None, timeout: float = 300,
                          backend_store_uri: str | None = None) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a free loopback port, artifacts under `root`; returns once /health answers.

    The runs and the registry live in `backend_store_uri` (e.g. `postgresql://...`), by default SQLite under
    `root`. Artifacts are proxied (`--artifacts-destination`): clients upload and download them over HTTP and
    need no access to `root`, as with a remote server.
    """
    root.mkdir(parents=True, exist_ok=True)
    args = ["server", "--backend-store-uri", backend_store_uri or f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    return _start(args, "/health", "tracking server", log, env, root, timeout)


def _start(mlflow_args: list[str], ready_path: str, what: str, log: Path, env: dict | None, cwd: Path | None,
           timeout: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ if env is None else env)
    # mlflow starts `uvicorn` by name: the virtualenv's bin must be on PATH, as after `source .venv/bin/activate`
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-m", "mlflow", *mlflow_args, "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "wb") as out:
        # its own process group, so the uvicorn child is stopped with it
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{url}{ready_path}", timeout=2):
                return proc, url
        except OSError:
            time.sleep(1)
    stop_model_server(proc)
    raise ServerError(f"{what} did not start (exit {proc.returncode}):\n{log.read_text()[-4000:]}")


def stop_model_server(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM a server's process group (either kind) and wait until every member is gone (uvicorn outlives mlflow)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, or it lingers as a zombie member of the group
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
