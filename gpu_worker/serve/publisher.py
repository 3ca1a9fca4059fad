"""Rank 0's publisher thread: each step's token events and end records to Redis in one pipeline.

It takes :class:`StepReport` objects from the engine loop, merges whatever
has queued up, and writes them with :func:`common.token_log.queue_messages`
(PUBLISH on the job's channel, XADD to its durable log) in one round trip.
Only after a job's last messages are written does it hand the job's result
to ``on_written``, so a job is never reported finished before its tokens
are readable. A Redis outage stalls this thread (with retries and back-off),
never the decode loop.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import redis

from common.metrics import GroupMetrics
from common.redis_conn import connect
from common.results import StreamEnd
from common.token_log import queue_messages
from gpu_worker.serve.engine_loop import StepReport

log = logging.getLogger(__name__)

RETRY_PAUSE_CAP_S = 5.0


class Publisher(threading.Thread):
    """Writes step reports to Redis; ``on_written(report)`` runs after each report's messages are stored.

    With ``metrics``, it counts the published tokens and their inter-token latency.
    """

    def __init__(self, redis_url: str, log_maxlen: int, log_ttl_s: int,
                 on_written: Callable[[StepReport], None], client_name: str = "tpq-publisher",
                 metrics: GroupMetrics | None = None) -> None:
        super().__init__(name="tpq-publisher", daemon=True)
        self._conn = connect(redis_url, client_name=client_name)
        self._maxlen, self._ttl_s = log_maxlen, log_ttl_s
        self._on_written = on_written
        self._metrics = metrics
        self._reports: queue.SimpleQueue[StepReport | None] = queue.SimpleQueue()
        self.messages_written = 0
        self.latencies_s: list[float] = []  # sampled -> written, for the benchmark (bounded below)

    def put(self, report: StepReport) -> None:
        """Queue a report (any thread; never blocks)."""
        self._reports.put(report)

    def close(self) -> None:
        """Write what is queued, then stop."""
        self._reports.put(None)
        self.join(timeout=30)
        self._conn.close()

    def run(self) -> None:
        while True:
            batch = [self._reports.get()]
            while True:
                try:
                    batch.append(self._reports.get_nowait())
                except queue.Empty:
                    break
            done = batch[-1] is None
            merged = _merge([r for r in batch if r is not None])
            if merged:
                self._write(merged)
                self._on_written(merged)
            if done:
                return

    def _write(self, report: StepReport) -> None:
        ends = [StreamEnd(request_id=r.request_id, num_tokens=len(r.token_ids), finish_reason=r.finish_reason)
                for r in report.finished]
        pause = 0.1
        while True:
            try:
                with self._conn.pipeline(transaction=False) as pipe:
                    queue_messages(pipe, [*report.events, *ends], self._maxlen, self._ttl_s)
                    pipe.execute(raise_on_error=False)  # a duplicate XADD (after a retry) is refused, harmlessly
                break
            except redis.RedisError as exc:
                log.warning("publishing %d token events failed (%s); retrying in %.1f s",
                            len(report.events), exc, pause)
                time.sleep(pause)
                pause = min(pause * 2, RETRY_PAUSE_CAP_S)
        now = time.time()
        if self._metrics is not None:
            self._metrics.tokens_published(report.events, [end.request_id for end in ends])
        self.messages_written += len(report.events) + len(ends)
        if len(self.latencies_s) < 1_000_000:
            self.latencies_s.extend(now - e.sampled_at for e in report.events if e.sampled_at is not None)


def _merge(reports: list[StepReport]) -> StepReport:
    if len(reports) == 1:
        return reports[0]
    merged = StepReport()
    for report in reports:
        merged.events.extend(report.events)
        merged.finished.extend(report.finished)
        merged.rejected.extend(report.rejected)
    return merged
