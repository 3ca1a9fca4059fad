"""A rank's heartbeat: a daemon thread that writes ``tpq:hb:<group>:<rank>`` with a TTL on its own connection."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import redis

from common.groups import make_heartbeat, write_heartbeat
from common.redis_conn import connect

log = logging.getLogger(__name__)


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

    ``step`` and ``in_flight`` are read at each beat (plain int reads, safe
    across threads). A failed write is logged and retried at the next beat:
    the supervisor, not this thread, decides what a missing heartbeat means.
    """

    def __init__(self, spec: HeartbeatSpec, rank: int, step: Callable[[], int],
                 in_flight: Callable[[], int] = lambda: 0) -> None:
        super().__init__(name=f"tpq-heartbeat-{rank}", daemon=True)
        self.spec, self.rank = spec, rank
        self._step, self._in_flight = step, in_flight
        self._stop_event = threading.Event()
        self._conn = connect(spec.redis_url, client_name=f"tpq-hb-{spec.group}-{rank}", retries=1)

    def beat(self) -> None:
        """Write one heartbeat now."""
        heartbeat = make_heartbeat(self.spec.group, self.rank, self.spec.incarnation,
                                   step=self._step(), in_flight=self._in_flight())
        write_heartbeat(self._conn, heartbeat, self.spec.ttl_s)

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
        """Stop beating (the key then expires after its TTL unless deleted)."""
        self._stop_event.set()
        self.join(timeout=5)
        self._conn.close()
