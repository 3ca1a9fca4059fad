"""The soak's workload: the jobs it submits and the client threads that run them to their end.

Session jobs go one by one (some read live through ``JobHandle.stream()``,
the rest through ``result()``; with ``--http``, some through the gateway
replicas instead: :mod:`bench.soak.http_clients`), session-less ones in
``submit_batch`` batches. A client that finds Redis unreachable retries with the same request
id; one that finds a job it submitted gone submits it again.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import random
import threading
import time
from dataclasses import dataclass, field

import redis

from bench.soak.http_clients import HttpAnswer, HttpJobs, JobEnded
from common.errors import JobCancelled, JobFailed, JobNotFound, ResultTimeout, StreamIncomplete, TpqError
from common.redis_conn import RedisUnavailableError
from common.results import JobResult
from producer import Client
from producer.batches import BatchHandle

WAIT_S = 2.0  # how long one client wait blocks before it checks the clock again
REDIS_ERRORS = (redis.RedisError, RedisUnavailableError, ConnectionError, OSError)
WORDS = ("robot", "sea", "stars", "mountain", "book", "quartz", "zebra", "fox", "river", "lamp", "engine", "queue")


@dataclass(frozen=True)
class Spec:
    """One job the soak submits."""

    job_id: str
    prompt: str
    session_id: str | None
    sampling: dict
    stream: bool
    http: bool = False  # through a gateway replica (``POST /v1/completions``), not the Python client


@dataclass
class Outcome:
    """What became of one job at the client."""

    spec: Spec
    state: str = "lost"  # finished, failed, cancelled, vanished, lost
    result: JobResult | None = None
    error: str = ""
    events: list[tuple[int, int, str, float, float]] = field(default_factory=list)  # index, id, text, sampled, received
    stream_error: str = ""
    resubmitted: int = 0  # times the client submitted it again because Redis had lost it
    submitted_at: float = 0.0  # Unix times: first submitted, and its end seen by the client
    ended_at: float | None = None
    final: JobResult | None = None  # the result Redis holds once everything settled
    http: HttpAnswer | None = None  # what an HTTP client received (``Spec.http``)

    def end(self, state: str, result: JobResult | None = None, error: str = "") -> None:
        self.state, self.result, self.error, self.ended_at = state, result, error, time.time()


def make_specs(n: int, rng: random.Random, args: argparse.Namespace) -> list[Spec]:
    """``n`` random jobs: session or session-less, streamed or not, greedy or seeded, as the flags' fractions say."""
    specs = []
    for i in range(n):
        session = rng.random() < args.session_fraction
        greedy = rng.random() < 0.7
        sampling = {"max_tokens": rng.randint(4, args.max_tokens), "ignore_eos": rng.random() < 0.5,
                    "temperature": 0.0 if greedy else 0.8}
        if not greedy:
            sampling["seed"] = rng.randrange(1 << 30)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
        spec = Spec(job_id=f"soak-{args.seed}-{i}", prompt=f"{i}: {words}",
                    session_id=f"s{rng.randrange(args.sessions)}" if session else None,
                    sampling=sampling, stream=session and rng.random() < args.stream_fraction)
        if session and args.http:  # drawn only then: a run without --http submits what it always did
            spec = dataclasses.replace(spec, http=rng.random() < args.http_fraction)
        specs.append(spec)
    return specs


def work_units(specs: list[Spec], batch_size: int) -> list[list[Spec]]:
    """Session jobs one per unit, session-less ones in batches, interleaved in submission order."""
    units, batch = [], []
    for spec in specs:
        if spec.session_id is not None:
            units.append([spec])
            continue
        batch.append(spec)
        if len(batch) == batch_size:
            units.append(batch)
            batch = []
    if batch:
        units.append(batch)
    return units


class Clock:
    """The soak's end: no deadline while the chaos runs; ``grace_s`` after it stops."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.deadline: float | None = None

    def chaos_stopped(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + self.grace_s

    def over(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


class Clients:
    """``threads`` client threads that run the work units to their end (or the clock's)."""

    def __init__(self, client: Client, units: list[list[Spec]], threads: int, clock: Clock,
                 http: HttpJobs | None = None) -> None:
        self.client, self.clock, self.http = client, clock, http
        self._units = collections.deque(units)
        self._lock = threading.Lock()
        self.outcomes: dict[str, Outcome] = {}
        self.redis_retries = 0
        self.resubmit_limit = 3
        self.all_submitted = threading.Event()
        self._submitting = 0
        self._threads = [threading.Thread(target=self._run, name=f"soak-client-{i}", daemon=True)
                         for i in range(threads)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            thread.join()

    def done(self) -> int:
        with self._lock:
            return sum(o.state != "lost" for o in self.outcomes.values())

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._units:
                    return
                unit = self._units.popleft()
                self._submitting += 1
            try:
                if unit[0].session_id is not None:
                    self._session_job(unit[0])
                else:
                    self._batch(unit)
            except Exception as exc:  # noqa: BLE001 - a soak bug must not hide the jobs' fate
                print(f"  soak client error on {unit[0].job_id}: {exc!r}", flush=True)
                for spec in unit:
                    outcome = self.outcomes.setdefault(spec.job_id, Outcome(spec))
                    outcome.error = outcome.error or f"soak client error: {exc!r}"

    def _submitted(self) -> None:
        with self._lock:
            self._submitting -= 1
            if not self._units and self._submitting == 0:
                self.all_submitted.set()

    def _retry_redis(self, call):
        """``call()``, retried while Redis is unreachable (the same request id each time), until the clock ends."""
        while True:
            try:
                return call()
            except REDIS_ERRORS:
                with self._lock:
                    self.redis_retries += 1
                if self.clock.over():
                    raise
                time.sleep(0.5)

    def _submit(self, spec: Spec):
        return self._retry_redis(lambda: self.client.submit(
            spec.prompt, session_id=spec.session_id, request_id=spec.job_id, **spec.sampling))

    def _resubmit(self, outcome: Outcome):
        """The job's handle, submitted again: Redis lost it (a crash took its last writes); None past the limit.

        A client that finds a job it submitted gone (``JobNotFound``) submits
        it again under the same request id; if the job came back meanwhile,
        that returns its handle and enqueues nothing.
        """
        if outcome.resubmitted >= self.resubmit_limit:
            return None
        outcome.resubmitted += 1
        return self._submit(outcome.spec)

    def _session_job(self, spec: Spec) -> None:
        outcome = self.outcomes[spec.job_id] = Outcome(spec, submitted_at=time.time())
        if spec.http:
            self._http_job(spec, outcome)
            return
        handle = self._submit(spec)
        self._submitted()
        if spec.stream:
            self._stream(handle, outcome)
        self._result(handle, outcome)

    def _http_job(self, spec: Spec, outcome: Outcome) -> None:
        """``spec`` through the gateway (its session picks the first replica), then its result from Redis."""
        try:
            outcome.http = self.http.run(spec, replica=int(spec.session_id[1:]) % len(self.http.gateways.ports),
                                         posted=self._submitted)
        except JobEnded as exc:
            outcome.end(exc.state, error=str(exc))
            return
        if outcome.http is None:
            return  # the clock ended first: lost
        outcome.events = [(index, -1, text, 0.0, received) for index, text, received in outcome.http.events]
        self._result(self._retry_redis(lambda: self.client.job(spec.job_id)), outcome)

    def _stream(self, handle, outcome: Outcome) -> None:
        stream = handle.stream(timeout=WAIT_S)
        while True:
            try:
                for event in stream:
                    outcome.events.append((event.index, event.token_id, event.text, event.sampled_at or 0.0,
                                           time.time()))
                return
            except ResultTimeout:
                if self.clock.over():
                    outcome.stream_error = "no end before the deadline"
                    return
            except StreamIncomplete as exc:
                outcome.stream_error = f"StreamIncomplete: {exc}"
                return
            except JobNotFound:
                handle = self._resubmit(outcome)
                if handle is None:
                    outcome.stream_error = "JobNotFound"
                    return
                stream = handle.stream(timeout=WAIT_S, start=stream.next_index)
            except (JobFailed, JobCancelled) as exc:
                outcome.stream_error = type(exc).__name__
                return
            except REDIS_ERRORS:
                with self._lock:
                    self.redis_retries += 1
                time.sleep(0.5)
                stream = handle.stream(timeout=WAIT_S, start=stream.next_index)

    def _result(self, handle, outcome: Outcome) -> None:
        while True:
            try:
                outcome.end("finished", handle.result(timeout=WAIT_S))
                return
            except ResultTimeout:
                if self.clock.over():
                    return
            except JobNotFound as exc:
                handle = self._resubmit(outcome)
                if handle is None:
                    _set_error(outcome, exc)
                    return
            except (JobFailed, JobCancelled) as exc:
                _set_error(outcome, exc)
                return
            except REDIS_ERRORS:
                with self._lock:
                    self.redis_retries += 1
                time.sleep(0.5)

    def _batch(self, unit: list[Spec]) -> None:
        for spec in unit:
            self.outcomes[spec.job_id] = Outcome(spec, submitted_at=time.time())
        requests = [{"prompt": s.prompt, "request_id": s.job_id, "sampling": s.sampling} for s in unit]
        batch = self._retry_redis(lambda: self.client.submit_batch(requests))
        self._submitted()
        pending = {h.id: h for h in batch.handles}
        while pending:
            try:
                for handle, result in BatchHandle(pending.values()).results(timeout=WAIT_S):
                    outcome = self.outcomes[handle.id]
                    if isinstance(result, JobResult):
                        outcome.end("finished", result)
                    elif isinstance(result, JobNotFound) and (again := self._resubmit(outcome)) is not None:
                        pending[handle.id] = again
                        continue
                    else:
                        _set_error(outcome, result)
                    del pending[handle.id]
            except ResultTimeout:
                if self.clock.over():
                    return
            except REDIS_ERRORS:
                with self._lock:
                    self.redis_retries += 1
                time.sleep(0.5)


def _set_error(outcome: Outcome, exc: TpqError) -> None:
    """End ``outcome`` in the state that ``exc`` (the error its client got) says."""
    if isinstance(exc, JobFailed):
        outcome.end("failed", error=exc.error or str(exc))
    elif isinstance(exc, JobCancelled):
        outcome.end("cancelled", error=str(exc))
    elif isinstance(exc, JobNotFound):
        outcome.end("vanished", error=str(exc))
    else:
        outcome.end("failed", error=f"{type(exc).__name__}: {exc}")

