"""Chaos soak (issue 4): N jobs through the whole stack while a chaos thread keeps breaking it.

    .venv/bin/python bench/soak.py --jobs 200                    # a few minutes
    .venv/bin/python bench/soak.py --groups 2 --redis-sigkill    # the full run: 2,000 jobs (bench/RESULTS.md)

The stack is the real one, every part its own process: an embedded
redis-server (AOF on, ``appendfsync everysec``), ``tpq supervisor`` (restarted
by the stack when it dies) and ``--groups`` worker groups of ``--tp`` ranks
(restarted by their launchers) on a tiny random Llama, with fast failure
detection (heartbeats every 0.25 s, TTL 1.5 s). The processes' logs go to
``--log-file``.

Client threads submit the jobs, a few at a time each: session jobs one by
one (``--stream-fraction`` of them read through ``JobHandle.stream()`` while
they run, the rest through ``result()``) and session-less jobs in small
``submit_batch`` batches (``BatchHandle.results()``). A client that finds
Redis unreachable retries with the same request id, as any client would.

The chaos thread waits ``--interval-s`` (+-50%) after the stack has recovered
from its previous fault, then picks one of: kill -9 of a random non-zero
rank, kill -9 of rank 0, kill -9 of the supervisor, a Redis restart
(SIGTERM: Redis writes its AOF and exits) and, with ``--redis-sigkill``, a
Redis SIGKILL (the AOF's last second of writes may be lost). It stops once
every job is submitted; the jobs then have ``--grace-s`` to end.

Printed at the end: jobs submitted, completed, failed (with their reasons),
lost (no terminal state within the grace time), duplicated or missing
tokens at the clients (every live stream against its job's result, and
every finished job's token log against its result), the faults and the
recovery times: from each fault to the stack being whole again (a group: a
new incarnation heartbeating on every rank and owning shards again; the
supervisor: a new one holding the lock; Redis: answering, every group
live), and from each fault to the next token a client received of a job the
fault interrupted (sampled after the fault). Timings on a shared 2-core
machine are noisy: read them as orders of magnitude.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from common import keys  # noqa: E402
from producer.local_stack.embedded_redis import RedisServer  # noqa: E402
from common.errors import (  # noqa: E402
    JobCancelled, JobFailed, JobNotFound, ResultTimeout, StreamIncomplete, TpqError,
)
from common.groups import read_group, read_groups, read_heartbeats, read_shard_map  # noqa: E402
from common.redis_conn import RedisUnavailableError, connect  # noqa: E402
from common.results import JobResult, StreamEnd, TokenEvent  # noqa: E402
from common.settings import get_settings  # noqa: E402
from common.token_log import position_of, read_log  # noqa: E402
from producer import Client  # noqa: E402
from producer.client import BatchHandle  # noqa: E402
from producer.local_stack.demo_cli import percentile  # noqa: E402
from router.rq_maintenance import started_entries  # noqa: E402
from producer.local_stack.stack import LocalStack, StackOptions  # noqa: E402

SOAK_ENV = {  # fast failure detection, as in the fault tests (tests/conftest.py FAST_ENV)
    "TPQ_HEARTBEAT_INTERVAL_S": "0.25",
    "TPQ_HEARTBEAT_TTL_S": "1.5",
    "TPQ_HANG_TIMEOUT_S": "10",
    "TPQ_NUM_SHARDS": "16",
    "TPQ_SUPERVISOR_METRICS_PORT": "0",
    "TPQ_WORKER_METRICS_PORT": "0",
}
FAULTS = ("rank", "rank0", "supervisor", "redis", "redis-kill")
DEFAULT_FAULTS = FAULTS[:4]  # redis-kill with --redis-sigkill
WAIT_S = 2.0  # how long one client wait blocks before it checks the clock again
REDIS_ERRORS = (redis.RedisError, RedisUnavailableError, ConnectionError, OSError)
WORDS = ("robot", "sea", "stars", "mountain", "book", "quartz", "zebra", "fox", "river", "lamp", "engine", "queue")


# ------------------------------------------------------------------ jobs


@dataclass(frozen=True)
class Spec:
    """One job the soak submits."""

    job_id: str
    prompt: str
    session_id: str | None
    sampling: dict
    stream: bool


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

    def end(self, state: str, result: JobResult | None = None, error: str = "") -> None:
        self.state, self.result, self.error, self.ended_at = state, result, error, time.time()


def make_specs(n: int, rng: random.Random, args: argparse.Namespace) -> list[Spec]:
    specs = []
    for i in range(n):
        session = rng.random() < args.session_fraction
        greedy = rng.random() < 0.7
        sampling = {"max_tokens": rng.randint(4, args.max_tokens), "ignore_eos": rng.random() < 0.5,
                    "temperature": 0.0 if greedy else 0.8}
        if not greedy:
            sampling["seed"] = rng.randrange(1 << 30)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
        specs.append(Spec(job_id=f"soak-{args.seed}-{i}", prompt=f"{i}: {words}",
                          session_id=f"s{rng.randrange(args.sessions)}" if session else None,
                          sampling=sampling, stream=session and rng.random() < args.stream_fraction))
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

    def __init__(self, client: Client, units: list[list[Spec]], threads: int, clock: Clock) -> None:
        self.client, self.clock = client, clock
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
        handle = self._submit(spec)
        self._submitted()
        if spec.stream:
            self._stream(handle, outcome)
        self._result(handle, outcome)

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
    if isinstance(exc, JobFailed):
        outcome.end("failed", error=exc.error or str(exc))
    elif isinstance(exc, JobCancelled):
        outcome.end("cancelled", error=str(exc))
    elif isinstance(exc, JobNotFound):
        outcome.end("vanished", error=str(exc))
    else:
        outcome.end("failed", error=f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------ chaos


@dataclass
class Fault:
    """One injected fault and how the stack came back from it."""

    kind: str
    target: str
    at_wall: float
    at_mono: float
    interrupted: set[str]  # jobs in flight where the fault hit
    lost_s: float = 0.0  # a SIGKILL whose AOF was cut back: the seconds of writes it lost
    ready_s: float | None = None  # None: not whole again within the recovery timeout (wedged)
    next_token_s: float | None = None


class AofTail(threading.Thread):
    """Samples the size of Redis' AOF file, so that a SIGKILL can also drop what a machine crash would lose.

    A killed redis-server loses nothing it has written to the file (the
    page cache survives the process); a crashed machine loses what was not
    fsynced, up to about ``lost_s`` with ``appendfsync everysec``.
    :meth:`truncate` cuts the file back to its size ``lost_s`` ago (Redis
    loads a truncated AOF, ``aof-load-truncated yes``).
    """

    def __init__(self, path: Path, lost_s: float) -> None:
        super().__init__(name="soak-aof", daemon=True)
        self.path, self.lost_s = path, lost_s
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=200)  # time, inode, size
        self._lock = threading.Lock()

    def run(self) -> None:
        while True:
            try:
                stat = self.path.stat()
            except OSError:
                pass
            else:
                with self._lock:
                    self._samples.append((time.monotonic(), stat.st_ino, stat.st_size))
            time.sleep(0.05)

    def truncate(self) -> int:
        """Cut the (stopped) server's AOF to its size ``lost_s`` ago; the bytes dropped."""
        stat = self.path.stat()
        then = time.monotonic() - self.lost_s
        with self._lock:
            old = [(inode, size) for t, inode, size in self._samples if t <= then]
            self._samples.clear()
        if not old or old[-1][0] != stat.st_ino or old[-1][1] >= stat.st_size:
            return 0  # rewritten meanwhile, or nothing new: keep it whole
        os.truncate(self.path, old[-1][1])
        return stat.st_size - old[-1][1]


class Chaos(threading.Thread):
    """Injects one fault every ``interval_s`` (+-50%) after the stack has recovered from the previous one."""

    def __init__(self, stack: LocalStack, server: RedisServer, kinds: list[str], interval_s: float,
                 recovery_timeout_s: float, rng: random.Random, aof_lost_s: float) -> None:
        super().__init__(name="soak-chaos", daemon=True)
        self.stack, self.server, self.kinds = stack, server, kinds
        self.aof = AofTail(server.dir / "appendonly.aof", aof_lost_s) if aof_lost_s > 0 else None
        if self.aof is not None:
            self.aof.start()
        self.interval_s, self.recovery_timeout_s, self.rng = interval_s, recovery_timeout_s, rng
        self.conn = connect(server.url, client_name="tpq-soak-chaos")
        self.queue_names = keys.shard_queue_names(stack.settings.num_shards) + [keys.BATCH_QUEUE]
        self.faults: list[Fault] = []
        self.skipped: collections.Counter[str] = collections.Counter()
        self.stop_event = threading.Event()

    def stop(self) -> None:
        self.stop_event.set()
        self.join()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s * self.rng.uniform(0.5, 1.5)):
            kind = self.rng.choice(self.kinds)
            try:
                fault = self._inject(kind)
            except REDIS_ERRORS as exc:
                self.skipped[f"{kind} (Redis error: {type(exc).__name__})"] += 1
                continue
            if fault is None:
                continue
            self.faults.append(fault)
            fault.ready_s = self._wait_recovered(fault)
            print(f"  fault {len(self.faults)}: {fault.kind} {fault.target}: whole again after "
                  f"{_seconds(fault.ready_s)}", flush=True)

    # -- injecting

    def _inject(self, kind: str) -> Fault | None:
        if kind in ("rank", "rank0"):
            return self._kill_rank(kind)
        interrupted = {e.job_id for e in started_entries(self.conn, self.queue_names)}
        now_wall, now_mono = time.time(), time.monotonic()
        if kind == "supervisor":
            owner = self.conn.get(keys.supervisor_lock())
            self.stack.supervisor.kill()
            return Fault(kind, f"pid {self.stack.supervisor.pid} (lock {_text(owner)})", now_wall, now_mono,
                         interrupted)
        dropped = 0
        if kind == "redis":
            self.server.stop()
        else:
            self.server.kill()
            dropped = self.aof.truncate() if self.aof is not None else 0
        self.conn.connection_pool.disconnect()
        self.server.start()
        what = f"port {self.server.port}" + (f", {dropped:,} AOF bytes dropped" if dropped else "")
        return Fault(kind, what, now_wall, now_mono, interrupted, lost_s=self.aof.lost_s if dropped else 0.0)

    def _kill_rank(self, kind: str) -> Fault | None:
        live = self._live_groups()
        if not live:
            self.skipped[f"{kind} (no live group)"] += 1
            return None
        group = self.rng.choice(sorted(live))
        info, beats = live[group]
        rank = 0 if kind == "rank0" else self.rng.randrange(1, info.tp)
        if rank == 0 and beats[0].pid != info.pid:
            self.skipped[f"{kind} (rank 0 pid changed)"] += 1
            return None
        interrupted = {e.job_id for e in started_entries(self.conn, self.queue_names)
                       if e.worker_name == info.worker_name}
        pid = beats[rank].pid
        now_wall, now_mono = time.time(), time.monotonic()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            self.skipped[f"{kind} (process already gone)"] += 1
            return None
        return Fault(kind, f"{group} rank {rank} pid {pid} (incarnation {info.incarnation})", now_wall, now_mono,
                     interrupted)

    def _live_groups(self) -> dict:
        """Groups whose every rank heartbeats with the registered incarnation: ``{name: (info, beats)}``."""
        live = {}
        beats = read_heartbeats(self.conn)
        for name, info in read_groups(self.conn).items():
            mine = {b.rank: b for b in beats if b.group == name and b.incarnation == info.incarnation}
            if len(mine) == info.tp and self.conn.hget(keys.group_info(name), "fenced") is None:
                live[name] = (info, [mine[r] for r in range(info.tp)])
        return live

    # -- waiting for the stack to be whole again

    def _wait_recovered(self, fault: Fault) -> float | None:
        deadline = fault.at_mono + self.recovery_timeout_s  # measured even when stop() came meanwhile
        while time.monotonic() < deadline:
            try:
                if self._recovered(fault):
                    return time.monotonic() - fault.at_mono
            except REDIS_ERRORS:
                pass
            time.sleep(0.05)
        return None

    def _recovered(self, fault: Fault) -> bool:
        if fault.kind == "supervisor":
            owner = _text(self.conn.get(keys.supervisor_lock()))
            return owner is not None and owner not in fault.target
        if fault.kind in ("rank", "rank0"):
            group = fault.target.split()[0]
            info = read_group(self.conn, group)
            if info is None or info.incarnation in fault.target:
                return False
        return self._whole()

    def _whole(self) -> bool:
        live = self._live_groups()
        if set(live) != set(self.stack.group_names):
            return False
        epoch, shard_map = read_shard_map(self.conn)
        return (epoch > 0 and len(shard_map) == self.stack.settings.num_shards
                and set(shard_map.values()) == set(live))


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _seconds(value: float | None) -> str:
    return "never (wedged)" if value is None else f"{value:.1f} s"


# ------------------------------------------------------------------ checks and report


def next_tokens(faults: list[Fault], outcomes: dict[str, Outcome]) -> None:
    """Each fault's time to the next token a client received of a job it interrupted, sampled after it."""
    for fault in faults:
        received = [recv for job_id in fault.interrupted if job_id in outcomes
                    for _i, _t, _x, sampled, recv in outcomes[job_id].events if sampled > fault.at_wall]
        if received:
            fault.next_token_s = min(received) - fault.at_wall


def check_stream(outcome: Outcome) -> tuple[int, int, int]:
    """(duplicated, missing, differing) tokens of a live stream against the result its client got."""
    tokens = outcome.result.token_ids
    seen = collections.Counter(index for index, *_ in outcome.events)
    duplicated = sum(count - 1 for count in seen.values())
    missing = sum(1 for i in range(len(tokens)) if i not in seen) + sum(1 for i in seen if i >= len(tokens))
    first = {}
    for index, token_id, *_ in outcome.events:
        first.setdefault(index, token_id)
    differing = sum(1 for i, token_id in first.items() if i < len(tokens) and tokens[i] != token_id)
    text = "".join(x for _i, _t, x, *_ in sorted(outcome.events, key=lambda e: e[0]))
    return duplicated, missing, differing + (text != outcome.result.text and not (duplicated or missing))


def check_log(conn, job_id: str, result: JobResult) -> str:
    """'' if the job's token log is ``result``, token for token, with no gap and an end record; else what differs."""
    messages = read_log(conn, job_id)
    tokens = [m for m in messages if isinstance(m, TokenEvent)]
    ends = [m for m in messages if isinstance(m, StreamEnd)]
    indices = [t.index for t in tokens]
    if indices != list(range(len(indices))):
        holes = sorted(set(range(max(indices, default=-1) + 1)) - set(indices))
        return f"gap at token(s) {holes[:5]}"
    logged = [t.token_id for t in tokens]
    if logged != result.token_ids:
        first = next((i for i, (a, b) in enumerate(zip(logged, result.token_ids)) if a != b),
                     min(len(logged), len(result.token_ids)))
        return f"{len(logged)} logged tokens differ from the result's {len(result.token_ids)} from index {first}"
    if len(ends) != 1 or ends[0].num_tokens != len(tokens):
        return "no end record" if not ends else f"end record at {ends[0].num_tokens}, {len(tokens)} tokens"
    return ""


def exposed(outcome: Outcome, faults: list[Fault]) -> bool:
    """Whether a crash that lost writes (a SIGKILL whose AOF was cut back) fell within the job's life."""
    return any(f.lost_s and outcome.submitted_at <= f.at_wall
               and (outcome.ended_at is None or outcome.ended_at >= f.at_wall - f.lost_s) for f in faults)


def settle(client: Client, conn, outcomes: dict[str, Outcome], timeout_s: float) -> list[str]:
    """Wait until no job the client saw end is queued or running again (a crash that lost a job's completion
    runs it again), then read each finished job's result as Redis holds it; the jobs still queued or running."""
    ids = [o.spec.job_id for o in outcomes.values() if o.state == "finished"]
    deadline = time.monotonic() + timeout_s
    while True:
        with conn.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(keys.rq_job_key(job_id), "status")
            busy = [job_id for job_id, status in zip(ids, pipe.execute()) if _text(status) in ("queued", "started")]
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(1)
    for job_id in ids:
        try:
            outcomes[job_id].final = client.job(job_id).result(timeout=1)
        except TpqError:
            pass
    return busy


def report(args, specs, clients: Clients, chaos: Chaos, conn, elapsed_s: float, unsettled: list[str]) -> int:
    outcomes = clients.outcomes
    by_state = collections.Counter(o.state for o in outcomes.values())
    finished = [o for o in outcomes.values() if o.state == "finished"]
    lossy = {o.spec.job_id for o in outcomes.values() if exposed(o, chaos.faults)}
    defects = []  # (job id, what)
    counts = collections.Counter()
    for o in (o for o in finished if o.spec.stream):
        d, m, x = check_stream(o)
        counts.update({"duplicated": d, "missing": m, "differing": x})
        if o.spec.job_id in lossy:
            counts.update({"duplicated_lossy": d, "missing_lossy": m, "differing_lossy": x})
        if d or m or x or o.stream_error:
            defects.append((o.spec.job_id, f"live stream: {d} duplicated, {m} missing, {x} differing tokens "
                                           f"{o.stream_error}"))
    changed = [o for o in finished if o.final is not None and o.final.token_ids != o.result.token_ids]
    for o in changed:
        defects.append((o.spec.job_id, f"the result changed after its client got it: attempt "
                                       f"{o.result.attempt} -> {o.final.attempt}"))
    log_defects, forgotten = [], []
    for o in finished:
        if o.final is None and not conn.exists(keys.rq_job_key(o.spec.job_id)):
            forgotten.append(o)  # no job, no log: Redis lost its whole life (a lossy crash), after the client saw it
            if o.spec.job_id not in lossy:
                defects.append((o.spec.job_id, "Redis no longer knows the job, yet no crash lost writes"))
            continue
        why = check_log(conn, o.spec.job_id, o.final or o.result)
        if why:
            log_defects.append(o)
            defects.append((o.spec.job_id, f"token log: {why}"))
    failures = collections.Counter(f"{o.state}: {reason_of(o.error)}" for o in outcomes.values()
                                   if o.state not in ("finished", "lost"))
    attempts = collections.Counter((o.final or o.result).attempt for o in finished)
    next_tokens(chaos.faults, outcomes)
    kinds = collections.Counter(f.kind for f in chaos.faults)
    sessions = sum(s.session_id is not None for s in specs)
    streamed = sum(o.spec.stream for o in finished)

    def split(figure: str) -> str:
        lossy_part = counts[f"{figure}_lossy"]
        return f"{counts[figure]} {figure}" + (f" ({lossy_part} lossy)" if lossy_part else "")

    def lossy_of(items) -> str:
        n = sum(o.spec.job_id in lossy for o in items)
        return f" ({n} lossy)" if n else ""

    print(f"\nchaos soak: {len(specs)} jobs ({sessions} session jobs, {sum(s.stream for s in specs)} of them "
          f"streamed; {len(specs) - sessions} session-less in batches of {args.batch_size}), {args.groups} group(s) "
          f"x tp={args.tp}, tiny Llama, a fault every ~{args.interval_s:g} s after recovery, {elapsed_s / 60:.1f} min")
    if any(f.lost_s for f in chaos.faults):
        print(f"'lossy': a Redis SIGKILL whose AOF was cut back {args.aof_lost_s:g} s (what a machine crash with "
              "appendfsync everysec loses) fell within the job's life")
    print("| figure | value |")
    print("|---|---|")
    print(f"| submitted | {len(outcomes)} |")
    print(f"| completed | {by_state['finished']} |")
    print(f"| failed | {len(specs) - by_state['finished'] - by_state['lost']}"
          f"{'' if not failures else ': ' + '; '.join(f'{n} x {r!r}' for r, n in failures.most_common())} |")
    lost = [o for o in outcomes.values() if o.state == "lost"]
    print(f"| lost (no terminal state {args.grace_s:g} s after the chaos stopped) | {len(lost)} |")
    print(f"| live streams checked against the result their client got | {streamed}: {split('duplicated')}, "
          f"{split('missing')}, {split('differing')} tokens |")
    print(f"| results that changed after their client got them (ran again) | {len(changed)}{lossy_of(changed)} |")
    print(f"| token logs checked against the final results | {len(finished) - len(forgotten)}: "
          f"{len(log_defects)} with a gap or difference{lossy_of(log_defects)} |")
    print(f"| completed jobs Redis then forgot entirely (job and log), their client holding the result | "
          f"{len(forgotten)}{lossy_of(forgotten)} |")
    print(f"| completed jobs queued or running again 120 s after the soak | {len(unsettled)}"
          f"{lossy_of([outcomes[i] for i in unsettled])} |")
    print(f"| jobs submitted again by their client (Redis lost them) | "
          f"{sum(bool(o.resubmitted) for o in outcomes.values())} |")
    print(f"| faults | {len(chaos.faults)}: " + ", ".join(f"{k} {kinds[k]}" for k in chaos.kinds) + " |")
    for kind in chaos.kinds:
        mine = [f for f in chaos.faults if f.kind == kind]
        if not mine:
            continue
        ready = [f.ready_s for f in mine if f.ready_s is not None]
        wedged = sum(f.ready_s is None for f in mine)
        print(f"| {kind}: whole again, p50 / max | {describe(ready)}{f'; {wedged} never (wedged)' if wedged else ''} |")
        print(f"| {kind}: next token of an interrupted job, p50 / max | "
              f"{describe([f.next_token_s for f in mine if f.next_token_s is not None])} |")
    print(f"| attempts of completed jobs | " + ", ".join(f"{k}: {attempts[k]}" for k in sorted(attempts)) + " |")
    print(f"| client calls retried (Redis unreachable) | {clients.redis_retries} |")
    if chaos.skipped:
        print("faults skipped: " + ", ".join(f"{k} {n}" for k, n in chaos.skipped.items()))
    for job_id, what in sorted(defects, key=lambda d: d[0] in lossy)[:30]:
        o = outcomes[job_id]
        print(f"  defect{' (lossy)' if job_id in lossy else ''}: {job_id} {o.spec.sampling}: {what}; now: "
              f"{describe_job(conn, job_id)}")
    for o in lost[:20]:
        print(f"  lost: {o.spec.job_id}: {describe_job(conn, o.spec.job_id)}")
    for job_id in unsettled[:20]:
        print(f"  running again: {job_id}: {describe_job(conn, job_id)}")
    clean = not lost and all(job_id in lossy for job_id, _ in defects) and all(i in lossy for i in unsettled)
    return 0 if clean else 1


def reason_of(error: str) -> str:
    """A failure message with job ids, incarnations and numbers taken out, so equal causes count together."""
    text = re.sub(r"[0-9a-f]{12}", "<incarnation>", error)
    text = re.sub(r"soak-\d+-\d+", "<job>", text)
    text = re.sub(r"pid \d+", "pid <n>", text)
    return text[:300]


def describe(values: list[float]) -> str:
    if not values:
        return "n=0"
    return f"{percentile(values, 50):.1f} / {max(values):.1f} s (n={len(values)})"


def describe_job(conn, job_id: str) -> str:
    """Where a job stands in Redis: its rq hash, queue, group claim lists, started registry and token log."""
    status, origin, attempts, retries = (_text(v) for v in conn.hmget(
        keys.rq_job_key(job_id), ["status", "origin", "tpq_attempts", "retries_left"]))
    places = []
    if origin and conn.lpos(keys.rq_queue_key(origin), job_id) is not None:
        places.append(f"in queue {origin}")
    for group in conn.smembers(keys.groups_set()):
        if conn.lpos(keys.claimed_jobs(_text(group)), job_id) is not None:
            places.append(f"claimed by {_text(group)}")
    if origin and any(True for _ in conn.zscan_iter(f"rq:wip:{origin}", match=f"{job_id}:*")):
        places.append("in the started registry")
    messages = read_log(conn, job_id)
    return (f"status {status}, origin {origin}, started {attempts} times, retries left {retries}, "
            f"{', '.join(places) or 'in no queue, claim list or registry'}; token log: {len(messages)} messages, "
            f"last at {position_of(messages[-1]) if messages else '-'}")


# ------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--groups", type=int, default=1, choices=(1, 2))
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--interval-s", type=float, default=5.0, help="seconds between a recovery and the next fault")
    parser.add_argument("--faults", default=",".join(DEFAULT_FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    parser.add_argument("--redis-sigkill", action="store_true",
                        help="also SIGKILL Redis, then drop the AOF's last --aof-lost-s of writes")
    parser.add_argument("--aof-lost-s", type=float, default=1.0,
                        help="what a SIGKILL drops from the AOF: a machine crash with appendfsync everysec loses "
                             "about 1 s (a killed process alone loses nothing it wrote); 0 keeps the file whole")
    parser.add_argument("--clients", type=int, default=12, help="client threads, each with one unit of work at a time")
    parser.add_argument("--batch-size", type=int, default=8, help="session-less jobs per submit_batch")
    parser.add_argument("--session-fraction", type=float, default=0.7)
    parser.add_argument("--stream-fraction", type=float, default=0.5, help="of the session jobs")
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--grace-s", type=float, default=300.0, help="time the jobs have after the chaos stops")
    parser.add_argument("--recovery-timeout-s", type=float, default=120.0,
                        help="a part not back within this is reported wedged")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-file", default=None, help="the stack's logs (default: a file in /tmp, printed)")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    args.kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
    if unknown := set(args.kinds) - set(FAULTS):
        parser.error(f"unknown fault(s) {', '.join(sorted(unknown))}; known: {', '.join(FAULTS)}")
    if args.redis_sigkill and "redis-kill" not in args.kinds:
        args.kinds.append("redis-kill")
    if args.tp < 2 and "rank" in args.kinds:
        args.kinds.remove("rank")  # no non-zero rank to kill
    return args


def redirect_stderr(path: str) -> None:
    """The stack's processes inherit fd 2: point it at ``path``; this process's ``sys.stderr`` stays where it was."""
    sys.stderr.flush()
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)


def main() -> int:
    args = parse_args()
    rng = random.Random(args.seed)
    log_file = args.log_file or f"/tmp/tpq-soak-{os.getpid()}.log"
    print(f"stack logs: {log_file}", flush=True)
    redirect_stderr(log_file)
    logging.basicConfig(filename=log_file, level=logging.WARNING,
                        format="%(asctime)s soak %(levelname)s %(name)s: %(message)s")
    from tests.checkpoints import write_tiny_llama

    with tempfile.TemporaryDirectory(prefix="tpq-soak-") as tmp:
        os.environ.update(SOAK_ENV, TPQ_DATA_DIR=str(Path(tmp) / "data"))
        model = write_tiny_llama(Path(tmp) / "model")
        server = RedisServer(Path(tmp) / "redis").start()
        os.environ["TPQ_REDIS_URL"] = server.url
        settings = get_settings()
        stack = LocalStack(settings, StackOptions(
            groups=args.groups, tp=args.tp, log_level=args.log_level, metrics=False,
            worker_args=["--model", str(model), "--kv-cache-gb", "0.05"]))
        try:
            stack.start()
            stack.wait_ready(timeout_s=300)
            with Client(server.url, settings=settings) as client:
                return soak(args, rng, stack, server, client)
        finally:
            stack.stop()
            server.close()


def soak(args, rng: random.Random, stack: LocalStack, server: RedisServer, client: Client) -> int:
    specs = make_specs(args.jobs, rng, args)
    clock = Clock(args.grace_s)
    clients = Clients(client, work_units(specs, args.batch_size), args.clients, clock)
    chaos = Chaos(stack, server, args.kinds, args.interval_s, args.recovery_timeout_s, rng, args.aof_lost_s)
    started = time.monotonic()
    print(f"soak: {len(specs)} jobs, {args.clients} client threads, faults: {', '.join(args.kinds)}", flush=True)
    clients.start()
    chaos.start()
    while not clients.all_submitted.wait(10):
        print(f"  {time.monotonic() - started:.0f} s: {clients.done()} of {len(specs)} jobs ended, "
              f"{len(chaos.faults)} faults", flush=True)
    print(f"  {time.monotonic() - started:.0f} s: every job submitted; stopping the chaos", flush=True)
    chaos.stop()
    clock.chaos_stopped()
    clients.join()
    elapsed = time.monotonic() - started
    conn = connect(server.url)
    try:
        unsettled = settle(client, conn, clients.outcomes, timeout_s=120)
        return report(args, specs, clients, chaos, conn, elapsed, unsettled)
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
