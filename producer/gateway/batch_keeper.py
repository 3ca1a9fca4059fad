"""The batch keeper: the background task of every gateway replica that carries HTTP batches to their end.

Every :data:`INTERVAL_S` (or at once when a batch is created or cancelled)
it goes over the open batches (``keys.api_batches_open``). For each one it
holds the lease of (:func:`~producer.gateway.batch_store.take_lease`: a
dead replica's lease expires after ``TPQ_HTTP_BATCH_LEASE_S`` and another
replica carries on) it:

1. enqueues the next input lines, one job per choice, at batch priority,
   with ids derived from the batch id and line number: job ids are
   idempotency keys, so re-driving an enqueue that a crash cut short
   enqueues nothing twice (``enqueued`` counts what is known enqueued);
2. harvests every finished line into the output hash as soon as its jobs
   finish (before their rq results expire), once per ``custom_id``,
   rendered as its endpoint renders (logprobs and echo with the model's
   vocabulary, as :meth:`~producer.gateway.completions.Completions.rendering`
   reads it);
3. when the batch is cancelled or its window passed: cancels its jobs that
   have not finished, and writes an error line for each line that never ran;
4. when every line has an output line: writes the output and error files
   and moves the batch to ``completed`` (through ``finalizing``),
   ``cancelled`` or ``expired``.

Each step only reads Redis and writes what is missing, so a replica killed
at any point leaves nothing another replica cannot finish.

Rate limits: the lines are not charged to any key's requests or tokens per
minute, as OpenAI's are not (its Batch API has limits of its own, per
batch and per queue of enqueued tokens, apart from the per-minute ones).
Only ``POST /v1/batches`` itself is charged, as every HTTP request is; its
lines are bounded by :data:`~producer.gateway.batch_lines.MAX_LINES` and run
at batch priority, behind every interactive job.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

import redis

from common import keys
from common.errors import JobCancelled, QueueFull, TpqError
from common.results import JobResult
from common.settings import Settings
from producer.async_client import AsyncClient
from producer.gateway.batch_lines import BatchLine, error_line, line_from_json, output_line, unrun_line
from producer.cancel import cancel_job
from producer.gateway import batch_store as store
from producer.gateway.batch_store import BatchState
from producer.gateway.completions import Completions
from producer.gateway.errors import APIError
from producer.gateway.files import store_file
from producer.gateway.records import now_s
from producer.job_state import ResultWatch, job_state

log = logging.getLogger(__name__)

INTERVAL_S = 0.25
"""Seconds between the keeper's passes over the open batches."""
ENQUEUE_CHUNK_JOBS = 256
"""Most jobs one ``submit_batch`` call of the keeper enqueues."""
ENQUEUE_PER_PASS_JOBS = 4096
"""Most jobs one pass enqueues for one batch (so that harvesting keeps up)."""
READ_CHUNK_JOBS = 500
"""Jobs whose state one pipeline reads."""

STOP_CODES = {"cancelled": ("batch_cancelled", "the batch was cancelled before this request ran"),
              "expired": ("batch_expired", "this request could not be run before the completion window expired")}


def base_id(batch_id: str, line: BatchLine) -> str:
    """The id of an input line's completion (and its first job): ``<batch id>-<line number>``."""
    return f"{batch_id}-{line.number}"


@dataclass
class _Tracked:
    """What a replica knows of a batch it drives: every input line, and the positions not harvested yet."""

    lines: list[BatchLine]
    pending: set[int] = field(default_factory=set)


class BatchKeeper:
    """Carries the open HTTP batches on, from any replica (see the module's docstring).

    ``completions``: the gateway's, whose rendering (the vocabularies it
    read) the output lines share; by default one of its own on ``client``.
    """

    def __init__(self, client: AsyncClient, settings: Settings, completions: Completions | None = None) -> None:
        self.client, self.settings = client, settings
        self.completions = completions or Completions(client, client.sync_redis, settings)
        self.conn = client.redis
        self.token = uuid.uuid4().hex
        self._tracked: dict[str, _Tracked] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def lease_ms(self) -> int:
        return int(self.settings.http_batch_lease_s * 1000)

    def start(self) -> None:
        """Start the keeper's loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tpq-batch-keeper")

    def wake(self) -> None:
        """Make the next pass start now (a batch was created or cancelled)."""
        self._wake.set()

    async def aclose(self) -> None:
        """Stop the loop and give up this replica's leases, so another replica carries on at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for batch_id in list(self._tracked):
            with contextlib.suppress(redis.RedisError):
                await store.release_lease(self.conn, batch_id, self.token)

    async def _run(self) -> None:
        while True:
            try:
                await self.run_pass()
            except (redis.RedisError, OSError) as e:
                log.warning("batch keeper: Redis error (%s); trying again", e)
            except Exception:
                log.exception("batch keeper: unexpected error; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), INTERVAL_S)
            self._wake.clear()

    async def run_pass(self) -> None:
        """One pass over every open batch."""
        for raw in await self.conn.smembers(keys.api_batches_open()):
            batch_id = raw.decode() if isinstance(raw, bytes) else raw
            try:
                await self.drive(batch_id)
            except TpqError as e:
                log.warning("batch keeper: batch %s: %s", batch_id, e)

    # ------------------------------------------------------------ one batch

    async def drive(self, batch_id: str) -> None:
        """Carry batch ``batch_id`` one step on, if this replica holds (or takes) its lease."""
        lease = await store.take_lease(self.conn, batch_id, self.token, self.lease_ms)
        if lease is None:
            self._tracked.pop(batch_id, None)
            return
        state = await store.load(self.conn, batch_id)
        if state is None or state.status in store.FINAL:
            await store.close(self.conn, batch_id)
            await self._let_go(batch_id)
            return
        if lease == "new" or batch_id not in self._tracked:
            self._tracked[batch_id] = await self._track(state)
        tracked = self._tracked[batch_id]
        stop = await self._stop_reason(state)
        enqueued = state.count("enqueued")
        if stop is None:
            enqueued = await self._enqueue(state, tracked, enqueued)
        await self._harvest(state, tracked, enqueued, stop)
        if stop is not None:
            await self._stop(state, tracked, enqueued, stop)
        if not tracked.pending:
            await self._finish(batch_id, stop)

    async def _let_go(self, batch_id: str) -> None:
        self._tracked.pop(batch_id, None)
        await store.release_lease(self.conn, batch_id, self.token)

    async def _track(self, state: BatchState) -> _Tracked:
        """Every input line of ``state``'s batch, and which have no output line yet (read from Redis)."""
        total = state.count("total")
        raws: list[bytes] = []
        for first in range(0, total, 5000):
            raws += await store.lines(self.conn, state.id, first, min(total, first + 5000))
        lines = [line_from_json(raw) for raw in raws]
        done = await store.harvested(self.conn, state.id, [line.custom_id for line in lines])
        return _Tracked(lines, {pos for pos, is_done in enumerate(done) if not is_done})

    async def _stop_reason(self, state: BatchState) -> str | None:
        """``cancelled``, ``expired`` (the window passed: decided once, kept in ``stopping``), or None."""
        if state.status == "cancelling":
            return "cancelled"
        if state.fields.get("stopping") == "expired":
            return "expired"
        if time.time() >= state.spec["expires_at"]:
            await self.conn.hset(keys.api_batch(state.id), "stopping", "expired")
            return "expired"
        return None

    async def _enqueue(self, state: BatchState, tracked: _Tracked, enqueued: int) -> int:
        """Enqueue the next lines (up to :data:`ENQUEUE_PER_PASS_JOBS` jobs); how many lines are enqueued now."""
        budget = ENQUEUE_PER_PASS_JOBS
        while enqueued < len(tracked.lines) and budget > 0:
            chunk, jobs = [], 0
            for line in tracked.lines[enqueued:]:
                if chunk and jobs + line.completion.num_jobs > min(ENQUEUE_CHUNK_JOBS, self.settings.max_batch_size):
                    break
                chunk.append(line)
                jobs += line.completion.num_jobs
            requests = [r for line in chunk for r in line.requests(self.client.build_request, base_id(state.id, line))]
            try:
                await self.client.submit_batch(requests)
            except QueueFull:
                log.debug("batch keeper: batch %s: the queue is full; enqueueing again later", state.id)
                break
            enqueued += len(chunk)
            budget -= jobs
            await self.conn.hset(keys.api_batch(state.id), "enqueued", enqueued)
        return enqueued

    async def _outcomes(self, job_ids: list[str]) -> dict[str, JobResult | TpqError | None]:
        """Each job's outcome now (None while it may still change): its rq status and latest result entry."""
        outcomes: dict[str, JobResult | TpqError | None] = {}
        for first in range(0, len(job_ids), READ_CHUNK_JOBS):
            chunk = job_ids[first:first + READ_CHUNK_JOBS]
            async with self.conn.pipeline(transaction=False) as pipe:
                for job_id in chunk:
                    pipe.hget(keys.rq_job_key(job_id), "status")
                    pipe.xrevrange(keys.rq_result_key(job_id), count=1)
                replies = await pipe.execute()
            for i, job_id in enumerate(chunk):
                watch = ResultWatch(job_id)
                watch.feed(replies[2 * i + 1])
                outcomes[job_id] = watch.verdict(job_state(replies[2 * i]))
        return outcomes

    async def _harvest(self, state: BatchState, tracked: _Tracked, enqueued: int, stop: str | None) -> None:
        """Write the output line of every enqueued line whose jobs have all finished."""
        positions = sorted(pos for pos in tracked.pending if pos < enqueued)
        ids = {pos: tracked.lines[pos].job_ids(base_id(state.id, tracked.lines[pos])) for pos in positions}
        outcomes = await self._outcomes([job_id for pos in positions for job_id in ids[pos]])
        for pos in positions:
            line, line_outcomes = tracked.lines[pos], [outcomes[job_id] for job_id in ids[pos]]
            if any(o is None for o in line_outcomes):
                continue
            bid = base_id(state.id, line)
            if stop is not None and any(isinstance(o, JobCancelled) for o in line_outcomes):
                data, failed = unrun_line(line.custom_id, bid, *STOP_CODES[stop]), True
            else:
                data, failed = await self._output(line, bid, line_outcomes)  # type: ignore[arg-type]
            await store.harvest(self.conn, state.id, line.custom_id, {"line": line.number, "error": failed,
                                                                      "data": data}, failed)
            tracked.pending.discard(pos)

    async def _output(self, line: BatchLine, bid: str, outcomes: list[JobResult | TpqError]) -> tuple[dict, bool]:
        """A finished line's output line, rendered as its endpoint renders it (logprobs and echo included)."""
        vocab = echoes = None
        if line.renders_more and not any(isinstance(o, TpqError) for o in outcomes):
            try:
                vocab, echoes = await self.completions.rendering(line.record(bid, 0),
                                                                 line.requests(self.client.build_request, bid))
            except APIError as error:  # no vocabulary (any more): the endpoint's own 503
                return error_line(line, bid, error), True
        return output_line(line, bid, now_s(), outcomes, vocab=vocab, echoes=echoes)

    async def _stop(self, state: BatchState, tracked: _Tracked, enqueued: int, stop: str) -> None:
        """Cancel the unfinished jobs (once), and write the error line of each line never enqueued."""
        if state.fields.get("jobs_cancelled") != "1":
            job_ids = [j for pos in tracked.pending for j in tracked.lines[pos].job_ids(
                base_id(state.id, tracked.lines[pos]))]
            conn, settings = self.client.sync_redis, self.settings
            # on the client's own threads: its bounded synchronous pool is sized for them
            await self.client.run_sync(lambda: [cancel_job(conn, settings, job_id) for job_id in job_ids])
            await self.conn.hset(keys.api_batch(state.id), "jobs_cancelled", "1")
        for pos in sorted(p for p in tracked.pending if p >= enqueued):
            line = tracked.lines[pos]
            data = unrun_line(line.custom_id, base_id(state.id, line), *STOP_CODES[stop])
            await store.harvest(self.conn, state.id, line.custom_id, {"line": line.number, "error": True,
                                                                      "data": data}, True)
            tracked.pending.discard(pos)

    async def _finish(self, batch_id: str, stop: str | None) -> None:
        """Every line has its output line: write the files, and move the batch to its final status."""
        now = now_s()
        if stop is None and not await store.move(self.conn, batch_id, "finalizing", ["in_progress", "finalizing"],
                                                 now):
            return  # cancelled meanwhile: the next pass finishes it as cancelled
        entries = await store.output_entries(self.conn, batch_id)
        files: dict[str, str] = {}
        for name, failed in (("output", False), ("error", True)):
            data = [e["data"] for e in entries if e["error"] == failed]
            if data:
                content = "".join(json.dumps(d, separators=(",", ":"), ensure_ascii=False) + "\n" for d in data)
                stored = await store_file(self.conn, content.encode(), f"{batch_id}_{name}.jsonl", "batch_output",
                                          file_id=f"file-{batch_id}-{name}")
                files[f"{name}_file_id"] = stored["id"]
        if files:
            await self.conn.hset(keys.api_batch(batch_id), mapping=files)
        final, from_ = {"cancelled": ("cancelled", ["cancelling"]), "expired": ("expired", ["in_progress"]),
                        None: ("completed", ["finalizing"])}[stop]
        if await store.move(self.conn, batch_id, final, from_, now):
            await store.close(self.conn, batch_id)
            await self._let_go(batch_id)
            log.info("batch %s %s: %d output lines, %d error lines", batch_id, final,
                     sum(not e["error"] for e in entries), sum(e["error"] for e in entries))
