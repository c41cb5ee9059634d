"""Keras-Tuner's distributed search, configured as Keras-Tuner configures it: three environment variables.

A chief process runs the oracle (it picks each trial's hyperparameters and keeps the results); workers ask it
for trials over gRPC and train them. In this project the chief is `cxr train` (the whole flow: its search
task serves the oracle and then trains the best trials' networks) and a worker is `cxr search-worker`.

    KERASTUNER_TUNER_ID     "chief" on the chief; a distinct name per worker ("tuner0", "tuner1", ...)
    KERASTUNER_ORACLE_IP    on the chief: the address to listen on (0.0.0.0: every interface); on a worker: the
                            chief's address
    KERASTUNER_ORACLE_PORT  the same port on both

None set: the search runs in the flow's own process, as before. No TensorFlow or Keras import here, so the CLI
can check the settings before anything heavy starts.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Literal

from cxr_model.errors import ConfigError, ServerError

TUNER_ID, ORACLE_IP, ORACLE_PORT = "KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT"
# The chief's run carries this tag (the oracle's port) while it serves, so a worker can find the run it serves.
PORT_TAG = "cxr.search_oracle_port"


class SearchFault(RuntimeError):
    """A distributed search that cannot finish (no worker left, trials failing in a row): one line saying why."""


@dataclass(frozen=True)
class SearchRole:
    role: Literal["chief", "worker"]
    tuner_id: str
    ip: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


def search_role(environ: dict | None = None) -> SearchRole | None:
    """This process's part in a distributed search, from the environment; None for a search in one process.

    As Keras-Tuner reads them: `KERASTUNER_ORACLE_IP` present (even empty) means a distributed search. An
    incomplete, empty or malformed setting is a ConfigError here, where Keras-Tuner would fail later, mid-flow,
    or hand gRPC an address it cannot parse.
    """
    env = os.environ if environ is None else environ
    if ORACLE_IP not in env:
        others = [name for name in (TUNER_ID, ORACLE_PORT) if name in env]
        if others:
            raise ConfigError(f"{' and '.join(others)} set without {ORACLE_IP}: set all three of {TUNER_ID}, "
                                  f"{ORACLE_IP} and {ORACLE_PORT} for a distributed search, or none")
        return None
    ip = env[ORACLE_IP]
    missing = [name for name in (TUNER_ID, ORACLE_IP, ORACLE_PORT) if not env.get(name)]
    if missing:
        raise ConfigError(f"{ORACLE_IP}={ip!r} is set but {' and '.join(missing)} empty or not set: a "
                              f"distributed search needs all three of {TUNER_ID}, {ORACLE_IP} and {ORACLE_PORT}")
    raw_port, tuner_id = env[ORACLE_PORT], env[TUNER_ID]
    port = int(raw_port) if raw_port.isascii() and raw_port.isdigit() else -1  # no sign, no spaces: gRPC's reading
    if not 0 < port < 65536:
        raise ConfigError(f"{ORACLE_PORT}={raw_port!r} is not a port number (1-65535)")
    if ":" in ip and not ip.startswith("["):
        # Keras-Tuner joins "{ip}:{port}", which gRPC reads as an IPv6 address only in brackets
        raise ConfigError(f"{ORACLE_IP}={ip}: write an IPv6 address in brackets, as [{ip}]")
    # Keras-Tuner's own test: a tuner id containing "chief" is the chief
    return SearchRole("chief" if "chief" in tuner_id else "worker", tuner_id, ip, port)


def flow_role(tuner: str, environ: dict | None = None) -> SearchRole | None:
    """This process's role for `cxr train` (the flow): None (a search in one process) or the chief.

    ConfigError on a machine set up as a worker, which runs `cxr search-worker` instead, and for a tuner that
    cannot run distributed (`check_tuner`). The CLI calls it before the flow starts, the search task again for a
    flow started another way (a Prefect deployment).
    """
    role = search_role(environ)
    if role is not None and role.role == "worker":
        raise ConfigError(f"{TUNER_ID}={role.tuner_id} makes this process a search worker: run "
                              f"`cxr search-worker` there, and `cxr train` with {TUNER_ID}=chief on the chief")
    check_tuner(role, tuner)
    return role


def check_tuner(role: SearchRole | None, tuner: str) -> None:
    """ConfigError for a tuner that cannot run distributed as this project runs it.

    Hyperband's later rounds start from an earlier trial's checkpoint, read from the tuner's own folder; each
    worker has its own folder here (and wipes it as it starts), so a trial whose parent ran elsewhere would fail.
    """
    if role is not None and tuner == "hyperband":
        raise ConfigError("--tuner hyperband cannot run distributed here: its later rounds load earlier trials' "
                              "checkpoints, which stay on the worker that trained them; use random or bayesian")


def worker_role(environ: dict | None = None) -> SearchRole:
    """This process's role as a search worker; ConfigError naming the settings if it is not one."""
    role = search_role(environ)
    if role is None or role.role != "worker":
        raise ConfigError(f"a search worker needs {TUNER_ID} (a name per worker without 'chief', e.g. tuner0), "
                              f"{ORACLE_IP} (the chief's address) and {ORACLE_PORT}"
                              + (f"; {TUNER_ID}={role.tuner_id} is the chief's" if role is not None else ""))
    return role


def check_can_serve(role: SearchRole) -> None:
    """ServerError if the chief could not listen on its address (port taken, address not this host's).

    A plain bind without SO_REUSEPORT: gRPC sets that option, so a second chief's gRPC server would share the port
    with the first one's and split the workers' requests between two oracles; this bind fails on either.
    """
    host = role.ip.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: a port in TIME_WAIT is free
        try:
            sock.bind((host, role.port))
        except OSError as exc:
            raise ServerError(f"the search chief cannot listen on {role.address} ({ORACLE_IP}, {ORACLE_PORT}): "
                                  f"{exc.strerror or exc}") from None


def worker_instructions(role: SearchRole, run_id: str) -> str:
    """What to run on each worker machine, printed by the chief when it starts serving."""
    host = role.ip if role.ip not in ("0.0.0.0", "[::]") else socket.gethostname()
    return (f"Search chief: serving the Keras-Tuner oracle on {role.address} for run {run_id}; it waits until "
            f"workers have run every trial. On each worker (same data, same MLFLOW_TRACKING_URI): "
            f"{TUNER_ID}=tuner0 {ORACLE_IP}={host} {ORACLE_PORT}={role.port} cxr search-worker --data-dir DIR")


WORKER_WAIT_MINUTES = 10.0  # how long a search worker waits for its chief to serve before it gives up


def wait_for_oracle(role: SearchRole, wait_s: float) -> None:
    """Return once the chief's oracle accepts a connection; ServerError after `wait_s` without one."""
    import grpc

    channel = grpc.insecure_channel(role.address)
    try:
        grpc.channel_ready_future(channel).result(timeout=wait_s)
    except grpc.FutureTimeoutError:
        raise ServerError(f"no search chief answers at {role.address} (waited {wait_s:.0f} s): start "
                          f"`cxr train` with {TUNER_ID}=chief there first") from None
    finally:
        channel.close()
