"""A rank's heartbeat: a daemon thread that writes ``tpq:hb:<group>:<rank>`` with a TTL on its own connection."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import redis

from common.groups import make_heartbeat, write_heartbeat
from common.redis_conn import connect

log = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0  # steps/s and tokens/s are averaged over about this many seconds of heartbeats


@dataclass(frozen=True)
class HeartbeatSpec:
    """Where and how often a rank reports that it lives (picklable: child ranks get it at spawn)."""

    redis_url: str
    group: str
    incarnation: str
    interval_s: float
    ttl_s: float


class HeartbeatThread(threading.Thread):
    """Writes this rank's heartbeat every ``interval_s`` until stopped.

    ``step``, ``in_flight``, ``tokens`` and ``load`` (running and waiting
    sequences) are read at each beat (plain int reads, safe across threads).
    Each beat also carries steps/s and tokens/s over the last
    ``RATE_WINDOW_S`` and for how long ``step`` has not moved while jobs
    were in flight (``stalled_s``): the stall is measured here, by the rank
    whose loop stalls, so ``common.health.judge_group`` (the supervisor,
    ``tpq status``, ``tpq health``) needs one read and no timer of its own,
    and a restarted supervisor sees a hang that began before it. ``clock``
    (monotonic seconds) times the stall and the rates. A failed write is
    logged and retried at the next beat: the supervisor, not this thread,
    decides what a missing heartbeat means.
    """

    def __init__(self, spec: HeartbeatSpec, rank: int, step: Callable[[], int],
                 in_flight: Callable[[], int] = lambda: 0, tokens: Callable[[], int] = lambda: 0,
                 load: Callable[[], tuple[int, int]] = lambda: (0, 0),
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name=f"tpq-heartbeat-{rank}", daemon=True)
        self.spec, self.rank = spec, rank
        self._step, self._in_flight, self._tokens, self._load = step, in_flight, tokens, load
        self._clock = clock
        self._samples: deque[tuple[float, int, int]] = deque()  # (monotonic time, step, tokens)
        self._progress_at: float | None = None  # when step last moved (or nothing was in flight)
        self._stop_event = threading.Event()
        self._conn = connect(spec.redis_url, client_name=f"tpq-hb-{spec.group}-{rank}", retries=1)

    def beat(self) -> None:
        """Write one heartbeat now."""
        now = self._clock()
        step, in_flight, tokens = self._step(), self._in_flight(), self._tokens()
        running, waiting = self._load()
        steps_per_s, tokens_per_s = self._rates(now, step, tokens)
        previous_step = self._samples[-2][1] if len(self._samples) > 1 else None
        if self._progress_at is None or step != previous_step or in_flight == 0:
            self._progress_at = now
        heartbeat = make_heartbeat(self.spec.group, self.rank, self.spec.incarnation, step=step,
                                   in_flight=in_flight, tokens=tokens, running=running, waiting=waiting,
                                   steps_per_s=round(steps_per_s, 3), tokens_per_s=round(tokens_per_s, 3),
                                   stalled_s=round(now - self._progress_at, 3))
        write_heartbeat(self._conn, heartbeat, self.spec.ttl_s)

    def _rates(self, now: float, step: int, tokens: int) -> tuple[float, float]:
        """Steps/s and tokens/s from the oldest sample within the window to this one."""
        self._samples.append((now, step, tokens))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
            self._samples.popleft()
        then, old_step, old_tokens = self._samples[0]
        elapsed = now - then
        if elapsed <= 0:
            return 0.0, 0.0
        return max(0, step - old_step) / elapsed, max(0, tokens - old_tokens) / elapsed

    def run(self) -> None:
        failing = False
        while not self._stop_event.is_set():
            try:
                self.beat()
                if failing:
                    log.info("rank %d: heartbeats reach Redis again", self.rank)
                failing = False
            except redis.RedisError as exc:
                if not failing:
                    log.warning("rank %d: heartbeat not written (%s); retrying", self.rank, exc)
                failing = True
            self._stop_event.wait(self.spec.interval_s)

    def stop(self) -> None:
        """Stop beating, if started (the key then expires after its TTL unless deleted), and close the connection."""
        self._stop_event.set()
        if self.ident is not None:
            self.join(timeout=5)
        self._conn.close()
