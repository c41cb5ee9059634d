"""A distributed search's chief that notices dead workers and failing trials, where Keras-Tuner's waits for ever.

Keras-Tuner's chief (`keras_tuner/src/distribute/oracle_chief.py`) serves until every tuner id it has seen has
asked for a trial and been told to stop. A worker that dies keeps its id, and its trial, for ever; three failed
trials in a row raise inside a gRPC handler, which the chief never sees. `serve_oracle` serves the same oracle
with Keras-Tuner's own gRPC service, plus:

- **Heartbeats.** Each worker sends one every `timeout_s / 6` seconds from a thread (`Heartbeat`), over one extra
  method on the chief's port; every oracle call counts too. Keras-Tuner 1.4 reports a trial's metrics only at
  its end, too rarely to tell a long trial from a dead worker, hence the separate beat.
- **A worker silent for `timeout_s` seconds is dropped.** Its trial goes back into Keras-Tuner's retry queue
  (without counting as one of the trial's runs, as Keras-Tuner re-queues a reloaded search's running trials)
  for another worker, and `on_trial_lost` is told (the task layer marks the trial's MLflow run FAILED). A trial
  whose worker is lost `LOSSES_PER_TRIAL` times fails for good: it may be what kills them. A worker dropped
  between trials only leaves the set of workers the chief waits for.
- **Workers with nothing to do wait** (the oracle answers IDLE) while another worker's trial runs, so a trial
  re-queued at the end of the search has a worker to run it.
- **No live worker left** while a trial waits to run: `SearchFault`, one line. The chief waits for a first worker
  as long as it takes (it prints how to start one).
- **`max_consecutive_failed_trials` (3) failed trials in a row**: no more trials are handed out, the running
  ones are waited for (a dead worker's trial is dropped after `timeout_s`), then `SearchFault` with each failed
  trial's error.

A worker dropped that calls again (restarted with the same id, or back after a stall) is a worker again; reports
from its old connection about the trial it lost are ignored, since that trial may run elsewhere by then.

No MLflow here: what to record about a lost trial is the caller's `on_trial_lost`.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import keras_tuner as kt
from keras_tuner.src import protos
from keras_tuner.src.distribute.oracle_chief import OracleServicer
from keras_tuner.src.engine.trial import Trial, TrialStatus

from cxr_model.distributed import SearchFault

DEFAULT_TIMEOUT_S = 120.0  # a worker silent this long is dead (TrainConfig.search_worker_timeout)
BEATS_PER_TIMEOUT = 6  # a worker beats every timeout/6 s: five beats may be lost before it is dropped
LOSSES_PER_TRIAL = 2  # a trial whose worker dies this often fails instead of being handed out again
IDLE_WAIT_S = 2.0  # a worker told IDLE asks again after this long (Keras-Tuner's worker asks again at once)
HEARTBEAT_METHOD = "/cxr.SearchHeartbeat/Beat"
# a failed trial's error, sent by the worker before it ends the trial: Keras-Tuner's Trial message over gRPC has no
# field for it, so the chief would otherwise know only that the trial failed
TRIAL_ERROR_METHOD = "/cxr.SearchHeartbeat/TrialError"


@dataclass(frozen=True)
class LostTrial:
    trial_id: str
    tuner_id: str
    reason: str  # one line: why the trial's run ended
    requeued: bool  # True: another worker will run it; False: it failed for good


def _first_line_of_error(message: str | None) -> str:
    """The exception line of a trial's traceback (Keras-Tuner stores the whole traceback), shortened."""
    lines = [line.strip() for line in (message or "").strip().splitlines() if line.strip()]
    line = lines[-1] if lines else "no error recorded"
    return line if len(line) <= 300 else line[:297] + "..."


class ChiefWatch:
    """Liveness of the workers and the search's verdict, kept beside a Keras-Tuner oracle served on the chief.

    Every change to the oracle's state runs under the oracle's own lock (`keras_tuner.synchronized`), as its gRPC
    handlers do. `clock` is injectable for tests.
    """

    def __init__(self, oracle: kt.Oracle, timeout_s: float = DEFAULT_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic):
        self.oracle, self.timeout_s, self.clock = oracle, float(timeout_s), clock
        self.last_seen: dict[str, float] = {}  # tuner id -> when it last called or beat
        self.peers: dict[str, str] = {}  # gRPC peer (a worker's connection) -> its tuner id
        self.lost_peers: set[str] = set()  # connections of dropped workers: their reports are ignored
        self.finished_tuners: set[str] = set()  # told to stop: no longer expected to beat
        self.trial_tuner: dict[str, str] = {}  # trial id -> the worker that last ran it
        self.losses: Counter[str] = Counter()  # trial id -> how often its worker died
        self.errors: dict[str, str] = {}  # trial id -> the traceback its worker sent (TRIAL_ERROR_METHOD)
        self.stop_handed = False  # a worker was told the search has no more trials
        self.failure: str | None = None  # set once trials failed in a row: no more trials handed out
        # Checked here instead (`_check_failures`): Keras-Tuner raises inside end_trial, in a gRPC handler, half-way
        # through its bookkeeping, and the chief never hears of it.
        self.failure_limit = oracle.max_consecutive_failed_trials

    def _synced(self, fn: Callable, *args):
        return kt.synchronized(lambda _oracle, *a: fn(*a))(self.oracle, *args)

    # -- what the workers' calls tell (from the gRPC handlers) -------------------------------------------------
    def beat(self, tuner_id: str) -> None:
        self._synced(self._beat, tuner_id)

    def _beat(self, tuner_id: str) -> None:
        self.last_seen[tuner_id] = self.clock()

    def seen_peer(self, peer: str) -> None:
        self._synced(self._seen_peer, peer)

    def _seen_peer(self, peer: str) -> None:
        if peer in self.peers and peer not in self.lost_peers:
            self._beat(self.peers[peer])

    def is_lost_peer(self, peer: str) -> bool:
        return peer in self.lost_peers

    def create_trial(self, tuner_id: str, peer: str) -> Trial:
        """The oracle's create_trial, except: STOPPED once trials failed in a row, IDLE while others still run."""
        return self._synced(self._create_trial, tuner_id, peer)

    def _create_trial(self, tuner_id: str, peer: str) -> Trial:
        oracle = self.oracle
        self.peers[peer] = tuner_id
        self.lost_peers.discard(peer)  # a worker calling again (restarted, or back after a stall) is one again
        self.finished_tuners.discard(tuner_id)
        self._beat(tuner_id)
        if self.failure is not None and tuner_id not in oracle.ongoing_trials:
            oracle.tuner_ids.discard(tuner_id)
            self.finished_tuners.add(tuner_id)
            self.stop_handed = True
            return Trial(oracle.get_space(), status=TrialStatus.STOPPED)
        trial = oracle.create_trial(tuner_id)
        if trial.status == TrialStatus.STOPPED and oracle.ongoing_trials:
            # another worker's trial may yet come back to the queue: wait for it instead of leaving
            oracle.tuner_ids.add(tuner_id)
            return Trial(oracle.get_space(), trial_id=trial.trial_id, status=TrialStatus.IDLE)
        if trial.status == TrialStatus.STOPPED:
            self.finished_tuners.add(tuner_id)
            self.stop_handed = True
        elif trial.status == TrialStatus.RUNNING:
            self.trial_tuner[trial.trial_id] = tuner_id
        return trial

    def end_trial(self, trial: Trial) -> None:
        """The oracle's end_trial, then the check for failed trials in a row."""
        self._synced(self._end_trial, trial)

    def trial_error(self, trial_id: str, message: str) -> None:
        self._synced(self.errors.__setitem__, trial_id, message)

    def _end_trial(self, trial: Trial) -> None:
        trial.message = trial.message or self.errors.get(trial.trial_id)
        self.oracle.end_trial(trial)
        self._check_failures()

    def _check_failures(self) -> None:
        if self.failure is not None or not self.failure_limit:
            return
        oracle = self.oracle
        ended = [oracle.trials[t] for t in oracle.end_order]
        failed = list(itertools.takewhile(lambda t: t.status == TrialStatus.FAILED, reversed(ended)))
        if len(failed) >= self.failure_limit:
            errors = "; ".join(f"trial {t.trial_id} ({self.trial_tuner.get(t.trial_id, '?')}): "
                               f"{_first_line_of_error(t.message)}" for t in reversed(failed))
            self.failure = (f"{len(failed)} search trials failed in a row, the limit "
                            f"(max_consecutive_failed_trials={self.failure_limit}); the search stops: {errors}")
            print(f"Search chief: {self.failure}; no more trials are handed out, waiting for the running ones")

    # -- the chief's own checks (from its serving loop) ----------------------------------------------------------
    def check(self) -> list[LostTrial]:
        """Drop the workers silent for `timeout_s`; return the trials they held."""
        return self._synced(self._check)

    def _check(self) -> list[LostTrial]:
        oracle, now = self.oracle, self.clock()
        lost = []
        expected = set(oracle.tuner_ids) | set(oracle.ongoing_trials)
        for tuner_id in sorted(expected):
            silent = now - self.last_seen.setdefault(tuner_id, now)  # (a resumed oracle's: counted from now)
            if silent < self.timeout_s:
                continue
            oracle.tuner_ids.discard(tuner_id)
            self.lost_peers |= {peer for peer, t in self.peers.items() if t == tuner_id}
            trial = oracle.ongoing_trials.pop(tuner_id, None)
            if trial is None:
                print(f"Search chief: worker {tuner_id} stopped answering between trials ({silent:.0f} s without a "
                      f"heartbeat, limit {self.timeout_s:.0f} s); no longer waiting for it")
                continue
            lost.append(self._lose(trial, tuner_id, silent))
        return lost

    def _lose(self, trial: Trial, tuner_id: str, silent: float) -> LostTrial:
        oracle = self.oracle
        self.losses[trial.trial_id] += 1
        reason = (f"worker {tuner_id} stopped answering mid-trial ({silent:.0f} s without a heartbeat, "
                  f"limit {self.timeout_s:.0f} s)")
        requeue = self.failure is None and self.losses[trial.trial_id] < LOSSES_PER_TRIAL
        trial.message = reason
        if requeue:
            trial.status = TrialStatus.INVALID  # awaiting a retry, as Keras-Tuner marks one
            oracle._retry_queue.append(trial.trial_id)
            oracle._save_trial(trial)
            oracle.save()
        else:
            if self.failure is None:
                reason += f"; its workers died {self.losses[trial.trial_id]} times: the trial fails"
                trial.message = reason
            trial.status = TrialStatus.FAILED
            self._end_trial(trial)
        print(f"Search chief: trial {trial.trial_id}: {reason}; "
              + ("handed to the next worker that asks" if requeue else "not run again"))
        return LostTrial(trial.trial_id, tuner_id, reason, requeue)

    def verdict(self) -> bool:
        """True once the search has ended (every trial run, every live worker told to stop); SearchFault if it
        cannot end; False while serving goes on."""
        return self._synced(self._verdict)

    def _verdict(self) -> bool:
        oracle, now = self.oracle, self.clock()
        if oracle.ongoing_trials:
            return False
        if self.failure is not None:
            raise SearchFault(self.failure)
        all_created = bool(oracle.max_trials) and len(oracle.trials) >= oracle.max_trials
        if not oracle.tuner_ids and not oracle._retry_queue and (self.stop_handed or all_created):
            return True
        live = [t for t, seen in self.last_seen.items()
                if now - seen < self.timeout_s and t not in self.finished_tuners]
        if self.last_seen and not live:
            waiting = (f"trial {', '.join(oracle._retry_queue)} waits to run again" if oracle._retry_queue
                       else f"{oracle.remaining_trials()} trials still to run" if oracle.max_trials
                       else "trials still to run")
            raise SearchFault(f"no search worker left: none has sent a heartbeat for {self.timeout_s:.0f} s and "
                              f"{waiting}; start workers (`cxr search-worker`) and run `cxr train --resume` again")
        return False


class WatchedServicer(OracleServicer):
    """Keras-Tuner's oracle service, with each call seen by the `ChiefWatch`."""

    def __init__(self, oracle: kt.Oracle, watch: ChiefWatch):
        super().__init__(oracle)
        self.watch = watch

    def GetSpace(self, request, context):
        self.watch.seen_peer(context.peer())
        return super().GetSpace(request, context)

    def UpdateSpace(self, request, context):
        self.watch.seen_peer(context.peer())
        return super().UpdateSpace(request, context)

    def CreateTrial(self, request, context):
        trial = self.watch.create_trial(request.tuner_id, context.peer())
        return protos.get_service().CreateTrialResponse(trial=trial.to_proto())

    def UpdateTrial(self, request, context):
        if self.watch.is_lost_peer(context.peer()):  # a dropped worker's trial: its result no longer counts
            trial = self.oracle.get_trial(request.trial_id)
            return protos.get_service().UpdateTrialResponse(trial=trial.to_proto())
        self.watch.seen_peer(context.peer())
        return super().UpdateTrial(request, context)

    def EndTrial(self, request, context):
        if not self.watch.is_lost_peer(context.peer()):
            self.watch.seen_peer(context.peer())
            self.watch.end_trial(Trial.from_proto(request.trial))
        return protos.get_service().EndTrialResponse()

    def GetTrial(self, request, context):
        self.watch.seen_peer(context.peer())
        return super().GetTrial(request, context)


def _heartbeat_handler(watch: ChiefWatch) -> grpc.GenericRpcHandler:
    def beat(request: bytes, context) -> bytes:
        watch.beat(request.decode("utf-8", "replace"))
        return b""

    def trial_error(request: bytes, context) -> bytes:
        if not watch.is_lost_peer(context.peer()):
            report = json.loads(request)
            watch.trial_error(str(report["trial_id"]), str(report["message"]))
        return b""

    # raw bytes in and out: more methods on the oracle's port, no second service definition to generate
    service = HEARTBEAT_METHOD.split("/")[1]
    return grpc.method_handlers_generic_handler(service, {
        method.split("/")[2]: grpc.unary_unary_rpc_method_handler(handler)
        for method, handler in ((HEARTBEAT_METHOD, beat), (TRIAL_ERROR_METHOD, trial_error))})


def serve_oracle(oracle: kt.Oracle, address: str, watch: ChiefWatch,
                 on_trial_lost: Callable[[LostTrial], None] | None = None, poll_s: float = 1.0,
                 grace_s: float = 5.0) -> None:
    """Serve `oracle` to workers on `address` until the search ends; SearchFault when it cannot.

    What Keras-Tuner's `oracle_chief.start_server` does, with the `ChiefWatch`'s checks every `poll_s` seconds.
    `on_trial_lost` runs outside the oracle's lock; an error in it is printed, the search goes on.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))  # one call at a time, as Keras-Tuner serves
    protos.get_service_grpc().add_OracleServicer_to_server(WatchedServicer(oracle, watch), server)
    server.add_generic_rpc_handlers((_heartbeat_handler(watch),))
    server.add_insecure_port(address)
    limit = watch.failure_limit
    oracle.max_consecutive_failed_trials = None  # the watch checks it (Keras-Tuner compares with ==: None never)
    server.start()
    print(f"Search chief: a worker without a heartbeat for {watch.timeout_s:.0f} s is dropped and its trial "
          "handed to another worker")
    try:
        while True:
            for lost in watch.check():
                if on_trial_lost is not None:
                    try:
                        on_trial_lost(lost)
                    except Exception as exc:  # recording the loss must not end the search
                        print(f"Search chief: could not record trial {lost.trial_id}'s loss: {exc}")
            if watch.verdict():
                return
            time.sleep(poll_s)
    finally:
        oracle.max_consecutive_failed_trials = limit
        server.stop(grace_s)  # the last worker's STOPPED answer is delivered


class Heartbeat:
    """A daemon thread telling the chief at `address` every `interval_s` seconds that worker `tuner_id` lives.

    A beat that fails is only tried again at the next: the worker's own oracle calls say when the chief is gone.
    """

    def __init__(self, address: str, tuner_id: str, interval_s: float):
        self.address, self.tuner_id, self.interval_s = address, tuner_id, interval_s
        self.sent = 0  # beats the chief answered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{tuner_id}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)

    def _run(self) -> None:
        channel = grpc.insecure_channel(self.address)
        beat = channel.unary_unary(HEARTBEAT_METHOD)
        try:
            while True:
                try:
                    beat(self.tuner_id.encode(), timeout=max(1.0, self.interval_s))
                    self.sent += 1
                except grpc.RpcError:
                    pass
                if self._stop.wait(self.interval_s):
                    return
        finally:
            channel.close()


@contextmanager
def heartbeat(address: str, tuner_id: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Heartbeat]:
    """Beat for `tuner_id` while the block runs, `BEATS_PER_TIMEOUT` times per chief timeout."""
    beats = Heartbeat(address, tuner_id, timeout_s / BEATS_PER_TIMEOUT).start()
    try:
        yield beats
    finally:
        beats.stop()


def watch_worker_client(client, address: str, idle_wait_s: float = IDLE_WAIT_S) -> None:
    """Adapt a worker's Keras-Tuner oracle client (`tuner.oracle`) to the watched chief at `address`.

    - After an IDLE answer it waits `idle_wait_s` before asking again: Keras-Tuner's worker loop asks at once,
      which would keep the chief's single gRPC thread busy while the worker waits for a trial.
    - A failed trial's error goes to the chief (TRIAL_ERROR_METHOD) before the trial ends, on the same
      address, so the chief can name it when trials fail in a row.
    """
    create, end = client.create_trial, client.end_trial
    # in one process, gRPC's channels to one address share a connection: the chief sees the oracle client's
    send_error = grpc.insecure_channel(address).unary_unary(TRIAL_ERROR_METHOD)

    def create_trial(tuner_id):
        trial = create(tuner_id)
        if trial.status == TrialStatus.IDLE:
            time.sleep(idle_wait_s)
        return trial

    def end_trial(trial):
        if trial.status in (TrialStatus.INVALID, TrialStatus.FAILED) and trial.message:
            try:
                send_error(json.dumps({"trial_id": trial.trial_id, "message": trial.message}).encode(),
                           timeout=30)
            except grpc.RpcError as exc:  # the trial still ends; the chief then lacks only its error text
                print(f"Search worker: could not send trial {trial.trial_id}'s error to the chief: {exc.code()}")
        return end(trial)

    client.create_trial, client.end_trial = create_trial, end_trial


def serve_search(tuner: kt.Tuner, address: str, timeout_s: float, verbose: int = 0,
                 on_trial_lost: Callable[[LostTrial], None] | None = None) -> None:
    """What `tuner.search` does on Keras-Tuner's chief, served by `serve_oracle` instead of `start_server`."""
    tuner.oracle.verbose = verbose
    tuner.save()
    serve_oracle(tuner.oracle, address, ChiefWatch(tuner.oracle, timeout_s), on_trial_lost)
