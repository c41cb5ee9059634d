"""The distributed search's chief under faults: a worker dead mid-trial or between trials, no worker left, trials
failing in a row. Unit tests serve a real Keras-Tuner oracle over real gRPC in this process, with Keras-Tuner's own
worker client and a fake clock; the integration test kills a real worker process mid-trial."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import keras_tuner as kt
import mlflow
import pytest
from keras_tuner.src import protos
from keras_tuner.src.distribute.oracle_client import OracleClient

from cxr_model.distributed import SearchFault
from cxr_model.distributed_faults import (
    HEARTBEAT_METHOD,
    ChiefWatch,
    Heartbeat,
    LostTrial,
    serve_oracle,
    watch_worker_client,
)
from cxr_pneumonia.model_server import free_port
from tests.conftest import start_cxr_train
from tests.test_tracking_server import postgres, tracking_server  # noqa: F401 (fixtures)

TIMEOUT_S = 10.0  # the chief's heartbeat timeout in the unit tests, in fake seconds


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def until(condition: Callable[[], object], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@dataclass
class Chief:
    """`serve_oracle` in a thread: a real oracle, real gRPC on loopback, the liveness clock faked."""

    oracle: kt.Oracle
    watch: ChiefWatch
    clock: FakeClock
    port: int
    lost: list[LostTrial] = field(default_factory=list)
    outcome: dict = field(default_factory=dict)  # "done": True, or "error": the exception serve_oracle raised
    thread: threading.Thread | None = None

    def worker(self, tuner_id: str) -> OracleClient:
        """Keras-Tuner's own worker-side client, on its own connection (as a worker process has)."""
        os.environ["KERASTUNER_TUNER_ID"] = tuner_id
        client = OracleClient(self.oracle)
        client.tuner_id = tuner_id
        # gRPC shares one connection between a process's channels to one address; a worker process has its own
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=[("grpc.use_local_subchannel_pool", 1)])
        client.stub = protos.get_service_grpc().OracleStub(channel)
        watch_worker_client(client, f"127.0.0.1:{self.port}", idle_wait_s=0.0)
        return client

    def beat(self, tuner_id: str) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            channel.unary_unary(HEARTBEAT_METHOD)(tuner_id.encode(), timeout=5)

    def advance(self, seconds: float, *alive: str) -> None:
        """Move the clock; the named workers beat at the new time (the others stay silent).

        Both under the oracle's lock, where the chief's checks run: a check between the two would find the live
        workers silent as well, which a loaded machine makes likely. `beat` sends a heartbeat over gRPC instead.
        """
        def move(_oracle: kt.Oracle) -> None:
            self.clock.now += seconds
            for tuner_id in alive:
                self.watch.beat(tuner_id)

        kt.synchronized(move)(self.oracle)

    @property
    def serving(self) -> bool:
        return self.thread.is_alive()

    def wait(self, seconds: float = 10.0) -> dict:
        self.thread.join(seconds)
        assert not self.thread.is_alive(), "the chief still serves"
        return self.outcome


@pytest.fixture
def start_chief(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Chief]]:
    chiefs = []

    def start(max_trials: int = 3) -> Chief:
        oracle = kt.oracles.RandomSearchOracle(objective=kt.Objective("val_auc", "max"), max_trials=max_trials,
                                               seed=1)
        space = kt.HyperParameters()
        space.Int("units", 1, 10_000)
        oracle.update_space(space)
        oracle._set_project_dir(str(tmp_path), f"search{len(chiefs)}")
        oracle.verbose = 0
        clock = FakeClock()
        chief = Chief(oracle, ChiefWatch(oracle, TIMEOUT_S, clock), clock, free_port())
        monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
        monkeypatch.setenv("KERASTUNER_ORACLE_PORT", str(chief.port))
        monkeypatch.setenv("KERASTUNER_TUNER_ID", "tuner0")

        def serve() -> None:
            try:
                serve_oracle(oracle, f"127.0.0.1:{chief.port}", chief.watch, chief.lost.append, poll_s=0.02,
                             grace_s=0)
                chief.outcome["done"] = True
            except Exception as exc:
                chief.outcome["error"] = exc

        chief.thread = threading.Thread(target=serve, daemon=True)
        chief.thread.start()
        chiefs.append(chief)
        return chief

    yield start
    for chief in chiefs:  # a test that failed half-way: end the search so the thread stops
        if chief.serving:
            chief.watch.failure = "test over"
            chief.oracle.ongoing_trials.clear()
            chief.thread.join(5)


def finish(client: OracleClient, trial, score: float = 0.7):
    """What a worker does after training: report the metric, then end the trial."""
    client.update_trial(trial.trial_id, {"val_auc": score})
    trial.status = "COMPLETED"
    client.end_trial(trial)


def fail(client: OracleClient, trial, error: str) -> None:
    """A trial whose training raised: Keras-Tuner's worker ends it INVALID with the traceback."""
    trial.status = "INVALID"
    trial.message = f"Traceback (most recent call last):\n  File \"x.py\", line 1\n{error}\n"
    client.end_trial(trial)


def test_a_worker_dead_mid_trial_has_its_trial_run_by_another(start_chief) -> None:
    chief = start_chief(max_trials=3)
    a, b = chief.worker("tuner0"), chief.worker("tuner1")
    lost = a.create_trial("tuner0")
    for _ in range(2):
        finish(b, b.create_trial("tuner1"))
    # every trial handed out, one still running elsewhere: the idle worker waits instead of leaving
    assert b.create_trial("tuner1").status == "IDLE"
    chief.advance(TIMEOUT_S - 0.5, "tuner1")
    time.sleep(0.2)
    assert not chief.lost and chief.serving  # not yet silent for the timeout
    chief.advance(1.0, "tuner1")
    until(lambda: chief.lost)
    assert chief.lost == [LostTrial(lost.trial_id, "tuner0", "worker tuner0 stopped answering mid-trial (10 s "
                                                              "without a heartbeat, limit 10 s)", True)]
    # the dead worker's late report (a stalled process coming back) does not count: the trial runs again
    finish(a, lost, score=0.99)
    rerun = b.create_trial("tuner1")
    assert rerun.trial_id == lost.trial_id and rerun.status == "RUNNING"
    finish(b, rerun, score=0.5)
    assert b.create_trial("tuner1").status == "STOPPED"
    assert chief.wait() == {"done": True}
    trials = chief.oracle.trials.values()
    assert [t.status for t in trials] == ["COMPLETED"] * 3
    assert chief.oracle.trials[lost.trial_id].score == 0.5
    assert chief.oracle._run_times[lost.trial_id] == 1  # the loss is not one of the trial's runs


def test_no_worker_left_fails_in_one_line(start_chief) -> None:
    chief = start_chief(max_trials=3)
    a = chief.worker("tuner0")
    trial = a.create_trial("tuner0")
    chief.advance(TIMEOUT_S)
    outcome = chief.wait()
    assert chief.lost[0].trial_id == trial.trial_id and chief.lost[0].requeued
    error = outcome["error"]
    assert isinstance(error, SearchFault) and "\n" not in str(error)
    assert str(error).startswith(f"no search worker left: none has sent a heartbeat for 10 s and trial "
                                 f"{trial.trial_id} waits to run again")


def test_a_worker_dead_between_trials_is_no_longer_waited_for(start_chief) -> None:
    chief = start_chief(max_trials=3)
    a, b = chief.worker("tuner0"), chief.worker("tuner1")
    finish(a, a.create_trial("tuner0"))  # and then dies before asking for another
    finish(b, b.create_trial("tuner1"))
    finish(b, b.create_trial("tuner1"))
    assert b.create_trial("tuner1").status == "STOPPED"
    time.sleep(0.2)
    assert chief.serving  # Keras-Tuner's chief waits until tuner0 asks too: for ever, if it died
    chief.advance(TIMEOUT_S)
    assert chief.wait() == {"done": True}
    assert chief.lost == []  # it held no trial


def test_the_only_worker_dead_between_trials_fails_the_search(start_chief) -> None:
    chief = start_chief(max_trials=3)
    a = chief.worker("tuner0")
    finish(a, a.create_trial("tuner0"))
    chief.advance(TIMEOUT_S)
    error = chief.wait()["error"]
    assert isinstance(error, SearchFault) and "2 trials still to run" in str(error)


def test_three_failed_trials_in_a_row_stop_the_search_with_their_errors(start_chief) -> None:
    chief = start_chief(max_trials=6)
    a, b = chief.worker("tuner0"), chief.worker("tuner1")
    t0, t1 = a.create_trial("tuner0"), b.create_trial("tuner1")
    fail(a, t0, "ValueError: boom 0")
    t2 = a.create_trial("tuner0")
    fail(b, t1, "MemoryError: boom 1")
    t3 = b.create_trial("tuner1")  # two failures so far: trials are still handed out
    assert t3.status == "RUNNING"
    fail(a, t2, "ValueError: boom 2")
    assert a.create_trial("tuner0").status == "STOPPED"  # no more trials after the third failure
    time.sleep(0.2)
    assert chief.serving  # tuner1's trial still runs: its result is waited for
    finish(b, t3)
    error = chief.wait()["error"]
    assert isinstance(error, SearchFault) and "\n" not in str(error)
    assert str(error) == ("3 search trials failed in a row, the limit (max_consecutive_failed_trials=3); the search "
                          f"stops: trial {t0.trial_id} (tuner0): ValueError: boom 0; trial {t1.trial_id} (tuner1): "
                          f"MemoryError: boom 1; trial {t2.trial_id} (tuner0): ValueError: boom 2")
    assert chief.oracle.trials[t3.trial_id].status == "COMPLETED"
    assert chief.oracle.max_consecutive_failed_trials == 3  # restored once serving ends


def test_a_trial_whose_workers_keep_dying_fails_for_good(start_chief) -> None:
    chief = start_chief(max_trials=3)
    a, b, c = chief.worker("tuner0"), chief.worker("tuner1"), chief.worker("tuner2")
    trial = a.create_trial("tuner0")
    b.create_trial("tuner1")
    chief.advance(TIMEOUT_S, "tuner1")
    until(lambda: chief.lost)
    assert c.create_trial("tuner2").trial_id == trial.trial_id  # handed out again
    chief.advance(TIMEOUT_S, "tuner1")
    until(lambda: len(chief.lost) == 2)
    assert not chief.lost[1].requeued and "its workers died 2 times: the trial fails" in chief.lost[1].reason
    assert chief.oracle.trials[trial.trial_id].status == "FAILED"
    assert trial.trial_id in chief.oracle.end_order


def test_a_restarted_worker_with_the_same_id_takes_its_trial_back(start_chief) -> None:
    chief = start_chief(max_trials=1)
    trial = chief.worker("tuner0").create_trial("tuner0")
    chief.beat("tuner1")  # another worker still lives, loading its data: the search goes on
    chief.advance(TIMEOUT_S, "tuner1")
    until(lambda: chief.lost)
    restarted = chief.worker("tuner0")  # a new process: a new connection, the same id
    again = restarted.create_trial("tuner0")
    assert again.trial_id == trial.trial_id
    finish(restarted, again)
    assert restarted.create_trial("tuner0").status == "STOPPED"
    assert chief.wait() == {"done": True}


def test_heartbeats_keep_a_long_trial_alive(start_chief) -> None:
    chief = start_chief(max_trials=1)
    a = chief.worker("tuner0")
    a.create_trial("tuner0")
    beats = Heartbeat(f"127.0.0.1:{chief.port}", "tuner0", interval_s=0.02).start()
    for _ in range(4):  # 20 fake seconds of training, twice the timeout, beating all along
        chief.clock.now += TIMEOUT_S / 2
        until(lambda: chief.watch.last_seen["tuner0"] == chief.clock.now)
    assert chief.lost == [] and beats.sent > 0
    beats.stop()
    chief.advance(TIMEOUT_S)
    until(lambda: chief.lost)


def test_an_idle_answer_is_asked_again_after_a_pause() -> None:
    answers = iter([kt.engine.trial.Trial(kt.HyperParameters(), status=s) for s in ("IDLE", "RUNNING")])

    class Client:
        def create_trial(self, tuner_id):
            return next(answers)

        def end_trial(self, trial):
            pass

    client = Client()
    watch_worker_client(client, "127.0.0.1:1", idle_wait_s=0.2)
    started = time.monotonic()
    assert client.create_trial("t").status == "IDLE" and time.monotonic() - started >= 0.2
    started = time.monotonic()
    assert client.create_trial("t").status == "RUNNING" and time.monotonic() - started < 0.2


def test_a_lost_trials_run_is_marked_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr_pneumonia.tasks.search import fail_lost_trial_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("x", artifact_location=(tmp_path / "a").as_uri())
    parent = client.create_run(experiment).info.run_id
    tags = {"mlflow.parentRunId": parent, "cxr.role": "trial", "trial_id": "1"}
    dead = client.create_run(experiment, tags={**tags, "tuner_id": "tuner0"}).info.run_id
    other = client.create_run(experiment, tags={**tags, "tuner_id": "tuner1"}).info.run_id  # its rerun elsewhere
    fail_lost_trial_run(parent, LostTrial("1", "tuner0", "worker tuner0 stopped answering", True))
    assert client.get_run(dead).info.status == "FAILED"
    assert client.get_run(dead).data.tags["cxr.failure"] == "worker tuner0 stopped answering"
    assert client.get_run(other).info.status == "RUNNING"


def _start_worker(tuner_id: str, cwd: Path, data: Path, oracle: dict, url: str) -> subprocess.Popen:
    """`cxr search-worker` in a process group of its own (its flow's temporary Prefect server is in it too)."""
    cwd.mkdir()
    env = {**os.environ, **oracle, "KERASTUNER_TUNER_ID": tuner_id, "MLFLOW_TRACKING_URI": url,
           "CXR_WORK_DIR": str(cwd / "work"), "PYTHONUNBUFFERED": "1"}
    with open(cwd / "stdout.log", "w") as out, open(cwd / "stderr.log", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "cxr_pneumonia.cli", "search-worker", "--data-dir", str(data),
                                 "--wait-minutes", "10", "--threads", "1"], cwd=cwd, env=env, stdout=out, stderr=err,
                                start_new_session=True)


def _kill_worker(proc: subprocess.Popen) -> None:
    """`kill -9` of the worker's whole process group, as when its machine goes down: nothing of it lives on."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _worker_log(cwd: Path) -> str:
    """The worker's stdout (its JSON report) and stderr (its flow's log lines)."""
    return (cwd / "stdout.log").read_text() + (cwd / "stderr.log").read_text()


def _running_trial(client, tuner_id: str):
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.tuner_id = '{tuner_id}' and attributes.status = 'RUNNING'")
    return runs[0] if runs else None


@pytest.mark.integration
@pytest.mark.slow
def test_a_worker_killed_mid_trial_leaves_the_flow_to_finish(
        real_subset: Path, tracking_server: tuple[str, Path], tmp_path: Path) -> None:  # noqa: F811
    """`cxr train` as chief and two `cxr search-worker` processes; tuner0 is `kill -9`ed mid-trial once tuner1
    is up: the chief drops it after the timeout, marks that trial's run FAILED, tuner1 runs the trial again, and
    the flow registers its model."""
    from mlflow import MlflowClient

    url, _ = tracking_server
    client = MlflowClient(url)
    oracle = {"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(free_port())}
    # both workers start together: each takes about 20 s to start on 2 cores, longer than a trial, so a worker
    # started after the other has a trial may find the search done; six trials leave work for both
    chief, finish_flow = start_cxr_train(tmp_path / "chief", real_subset, "--max-trials", "6", "--search-epochs",
                                         "2", "--search-worker-timeout", "15", "--model-name", "cxr-faults",
                                         env={**os.environ, **oracle, "KERASTUNER_TUNER_ID": "chief"},
                                         tracking_uri=url)
    workers = {tuner_id: _start_worker(tuner_id, tmp_path / tuner_id, real_subset, oracle, url)
               for tuner_id in ("tuner0", "tuner1")}

    def wait_for(what: str, condition: Callable[[], object]):
        deadline = time.monotonic() + 600
        while not (found := condition()):
            assert time.monotonic() < deadline and chief.poll() is None, f"{what}: not before the chief ended"
            for tuner_id, proc in workers.items():
                assert proc.poll() is None, f"{tuner_id} ended:" + _worker_log(tmp_path / tuner_id)
            time.sleep(0.3)
        return found

    try:
        # tuner0 dies mid-trial once tuner1 has joined (else no worker would be left)
        wait_for("tuner1 joined", lambda: "Search worker tuner1: run" in _worker_log(tmp_path / "tuner1"))
        victim = wait_for("tuner0 mid-trial", lambda: _running_trial(client, "tuner0"))
        _kill_worker(workers["tuner0"])
        killed_at = time.monotonic()
        flow = finish_flow(timeout=600)
        print(f"the flow finished {time.monotonic() - killed_at:.0f} s after the kill")
        workers["tuner1"].wait(timeout=120)
    finally:
        chief.kill()
        for proc in workers.values():
            _kill_worker(proc)
    assert workers["tuner1"].returncode == 0, (tmp_path / "tuner1" / "stderr.log").read_text()[-3000:]
    trial_id = victim.data.tags["trial_id"]
    assert f"trial {trial_id}: worker tuner0 stopped answering mid-trial" in flow.stdout + flow.stderr

    dead = client.get_run(victim.info.run_id)
    assert dead.info.status == "FAILED" and "worker tuner0 stopped answering" in dead.data.tags["cxr.failure"]
    run_id = flow.result["run_id"]
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["search/completed_trials"] == 6
    trials = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}' and "
                                "tags.`cxr.role` = 'trial' and attributes.status = 'FINISHED'")
    finished = {t.data.tags["trial_id"]: t.data.tags["tuner_id"] for t in trials}
    assert sorted(finished) == [str(i) for i in range(6)] and len(trials) == 6  # each trial once, to the end
    assert finished[trial_id] == "tuner1"  # the killed worker's trial, run again by the other
    report = json.loads((tmp_path / "tuner1" / "stdout.log").read_text().strip().splitlines()[-1])
    assert trial_id in report["trials"]
    assert client.get_model_version_by_alias("cxr-faults", "champion").version == flow.result["registered"]["version"]


@pytest.mark.integration
@pytest.mark.slow
def test_the_chief_fails_in_one_line_when_its_only_worker_is_killed(
        real_subset: Path, tracking_server: tuple[str, Path], tmp_path: Path) -> None:  # noqa: F811
    """No worker left: `cxr train` ends with one `error:` line and exit status 1 after the timeout, not a hang;
    neither the flow's run nor the trial's is left RUNNING."""
    from mlflow import MlflowClient

    url, _ = tracking_server
    client = MlflowClient(url)
    oracle = {"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(free_port())}
    chief, finish_flow = start_cxr_train(tmp_path / "chief", real_subset, "--max-trials", "2",
                                         "--search-worker-timeout", "10", "--model-name", "cxr-faults-alone",
                                         env={**os.environ, **oracle, "KERASTUNER_TUNER_ID": "chief"},
                                         tracking_uri=url)
    worker = _start_worker("tuner0", tmp_path / "tuner0", real_subset, oracle, url)
    try:
        deadline = time.monotonic() + 600
        while (victim := _running_trial(client, "tuner0")) is None:
            assert time.monotonic() < deadline and worker.poll() is None and chief.poll() is None
            time.sleep(0.3)
        _kill_worker(worker)
        killed_at = time.monotonic()
        chief.wait(timeout=300)
        print(f"the chief failed {time.monotonic() - killed_at:.0f} s after the kill")
    finally:
        chief.kill()
        _kill_worker(worker)
    stderr = next((tmp_path / "chief").glob("stderr-*.log")).read_text()
    assert chief.returncode == 1, stderr[-4000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]  # the CLI's line (Prefect's log
    assert len(errors) == 1, stderr[-4000:]  # of its temporary server's end may follow)
    assert errors[0].startswith("error: no search worker left: none has sent a heartbeat for 10 s and trial "
                                f"{victim.data.tags['trial_id']} waits to run again"), errors
    assert client.get_run(victim.info.run_id).info.status == "FAILED"
    parent = client.get_run(victim.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"
    with pytest.raises(AssertionError):  # no result: the flow did not finish
        finish_flow(timeout=1)
