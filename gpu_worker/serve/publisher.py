"""Rank 0's publisher thread: each step's text, then its token events and end records to Redis in one pipeline.

It takes :class:`StepReport` objects from the engine loop and first runs
each through its :class:`TextStage` (detokenizing and stop strings, off the
decode thread): a stop string found asks the loop, through ``stop_request``,
to stop that sequence, and the tokens the engine sampled past it are
dropped before anything is written. Then it merges whatever has queued up
and writes it with :func:`common.token_log.append_messages`
(XADD to the job's durable log, PUBLISH on its channel) in one round trip.
Only after a job's last messages are written does it hand the job's result
to ``on_written``, so a job is never reported finished before its tokens
are readable. A Redis outage stalls this thread (with retries and back-off),
never the decode loop.

It keeps every message it wrote for a running job. A Redis that crashed can
come back without its last writes; the log then ends short of the next
message, and the publisher writes the missing ones again from what it kept,
so the log never has a hole while the job runs here.
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
from common.jobs import StreamMessage
from common.token_log import append_messages, message_runs, position_of, queue_messages
from gpu_worker.engine.text_stage import TextStage
from gpu_worker.serve.engine_loop import StepReport

log = logging.getLogger(__name__)

RETRY_PAUSE_CAP_S = 5.0


class Publisher(threading.Thread):
    """Writes step reports to Redis; ``on_written(report)`` runs after each report's messages are stored.

    ``texts`` makes the text of the engine's raw tokens (a report with only
    events and results, as tests write, needs none); ``stop_request(request_id)``
    asks the engine loop to stop a request whose stop string it found;
    ``on_failed()`` runs if the thread dies (its exception in ``error``). With
    ``metrics``, it counts the published tokens and their inter-token latency.
    """

    def __init__(self, redis_url: str, log_maxlen: int, log_ttl_s: int,
                 on_written: Callable[[StepReport], None], client_name: str = "tpq-publisher",
                 metrics: GroupMetrics | None = None, texts: TextStage | None = None,
                 stop_request: Callable[[str], None] = lambda request_id: None,
                 on_failed: Callable[[], None] = lambda: None) -> None:
        super().__init__(name="tpq-publisher", daemon=True)
        self._conn = connect(redis_url, client_name=client_name)
        self._maxlen, self._ttl_s = log_maxlen, log_ttl_s
        self._on_written = on_written
        self._texts, self._stop_request, self._on_failed = texts, stop_request, on_failed
        self.error: BaseException | None = None
        self._metrics = metrics
        self._reports: queue.SimpleQueue[StepReport | None] = queue.SimpleQueue()
        self._kept: dict[str, list[StreamMessage]] = {}  # per running job: its messages written here, in order
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
        try:
            self._publish()
        except BaseException as exc:  # noqa: BLE001 - reported to the group, which restarts
            log.exception("the publisher failed; the group stops")
            self.error = exc
            self._on_failed()

    def _publish(self) -> None:
        while True:
            batch = [self._reports.get()]
            while True:
                try:
                    batch.append(self._reports.get_nowait())
                except queue.Empty:
                    break
            done = batch[-1] is None
            reports = [r for r in batch if r is not None]
            for report in reports:  # one at a time, in order: a request's admission precedes its tokens
                self._add_text(report)
            merged = _merge(reports)
            if merged:
                self._write(merged)
                self._on_written(merged)
            if done:
                return

    def _add_text(self, report: StepReport) -> None:
        """Turn the report's raw tokens and finished requests into events and results; ask for the stops."""
        if not (report.admitted or report.tokens or report.done):
            return
        assert self._texts is not None, "the engine loop's reports need the publisher's text stage"
        for admit in report.admitted:
            self._texts.add(admit.request_id, admit.prompt_token_ids, admit.sampling, admit.resume_token_ids)
        text = self._texts.process(report.tokens, report.done)
        for request_id in text.stops:
            self._stop_request(request_id)
        report.events.extend(text.events)
        report.finished.extend(text.finished)
        report.admitted, report.tokens, report.done = [], [], []

    def _write(self, report: StepReport) -> None:
        ends = [StreamEnd(request_id=r.request_id, num_tokens=len(r.token_ids), finish_reason=r.finish_reason)
                for r in report.finished]
        runs = message_runs([*report.events, *ends])
        pause = 0.1
        while True:
            try:
                short = append_messages(self._conn, runs, self._maxlen, self._ttl_s)
                if short:
                    self._write_missing(runs, short)
                break
            except redis.RedisError as exc:
                log.warning("publishing %d token events failed (%s); retrying in %.1f s",
                            len(report.events), exc, pause)
                time.sleep(pause)
                pause = min(pause * 2, RETRY_PAUSE_CAP_S)
        self._keep(runs)
        now = time.time()
        if self._metrics is not None:
            self._metrics.tokens_published(report.events, [end.request_id for end in ends])
        self.messages_written += len(report.events) + len(ends)
        if len(self.latencies_s) < 1_000_000:
            self.latencies_s.extend(now - e.sampled_at for e in report.events if e.sampled_at is not None)

    def _write_missing(self, runs: list[list[StreamMessage]], short: dict[str, int]) -> None:
        """Write the runs whose log ends short of them again, from the log's end, with the messages kept."""
        again = []
        for run in runs:
            job_id = run[0].request_id
            if job_id not in short:
                continue
            kept = self._kept.get(job_id, [])
            if not kept or position_of(kept[-1]) + 1 != position_of(run[0]):
                kept = []
            have = position_of(kept[0]) if kept else position_of(run[0])
            if have > short[job_id]:
                log.error("job %s: its token log ends at %d but this run began at %d (Redis lost entries an "
                          "earlier run wrote); writing on at %d leaves a gap its readers cannot cross",
                          job_id, short[job_id], have, position_of(run[0]))
                with self._conn.pipeline(transaction=False) as pipe:
                    queue_messages(pipe, run, self._maxlen, self._ttl_s)
                    pipe.execute(raise_on_error=False)
                continue
            log.warning("job %s: its token log ends at %d, short of %d (Redis lost its last writes); "
                        "writing the missing messages again", job_id, short[job_id], position_of(run[0]))
            again.append(kept[short[job_id] - have:] + run)
        if again:
            append_messages(self._conn, again, self._maxlen, self._ttl_s)

    def _keep(self, runs: list[list[StreamMessage]]) -> None:
        """Remember the messages written for each running job; forget a job once its end is written."""
        for run in runs:
            job_id = run[0].request_id
            if isinstance(run[-1], StreamEnd):
                self._kept.pop(job_id, None)
                continue
            kept = self._kept.setdefault(job_id, [])
            if kept and position_of(run[0]) > position_of(kept[-1]) + 1:
                kept.clear()  # not a continuation: keep from here
            next_position = position_of(kept[-1]) + 1 if kept else 0
            kept.extend(m for m in run if position_of(m) >= next_position)


def _merge(reports: list[StepReport]) -> StepReport:
    if len(reports) == 1:
        return reports[0]
    merged = StepReport()
    for report in reports:
        merged.events.extend(report.events)
        merged.finished.extend(report.finished)
        merged.rejected.extend(report.rejected)
    return merged
