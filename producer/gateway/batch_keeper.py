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

A pass costs the same however long the batch: it enqueues at most
:data:`ENQUEUE_PER_PASS_JOBS` jobs (reading only their lines), and reads
the rq status of at most :data:`READ_PER_PASS_JOBS` jobs, the next of a
round over the pending lines (each is looked at every ``pending /
READ_PER_PASS_JOBS`` passes, long before its result expires), then the
results of those that ended. A replica keeps a few bytes per line. Long
walks (cancelling every job; writing the files a page at a time with
:class:`~producer.gateway.files.FileWriter`) renew the lease between pages
and stop when it is lost.

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
import logging
import time
import uuid
from array import array
from collections.abc import Iterable

import redis

from common import keys
from common.errors import JobCancelled, QueueFull, TpqError
from common.results import JobResult
from common.settings import Settings
from producer.async_client import AsyncClient
from producer.cancel import cancel_job
from producer.gateway import batch_store as store
from producer.gateway.batch_lines import BatchLine, error_line, line_from_json, output_line, unrun_line
from producer.gateway.batch_store import BatchState, Harvest
from producer.gateway.completions import Completions
from producer.gateway.errors import APIError
from producer.gateway.files import FileWriter
from producer.gateway.records import job_ids, now_s
from producer.job_state import ResultWatch, job_state

log = logging.getLogger(__name__)

INTERVAL_S = 0.25
"""Seconds between the keeper's passes over the open batches."""
ENQUEUE_CHUNK_JOBS = 256
"""Most jobs one ``submit_batch`` call of the keeper enqueues."""
ENQUEUE_PER_PASS_JOBS = 4096
"""Most jobs one pass enqueues for one batch (so that harvesting keeps up)."""
QUEUE_FULL_BACKOFF_S = 1.0
"""Seconds a batch whose enqueue found the queue full waits before it tries again (reading no line meanwhile)."""
READ_PER_PASS_JOBS = 2000
"""Most jobs whose state one pass reads for one batch: the next ones of its round over the pending lines."""
PAGE_LINES = 1000
"""Lines one step of a long walk (cancelling, writing the files) covers; the lease is renewed after each."""
HARVEST_CHUNK_LINES = 200
"""Ended lines read, rendered and written in one go (between them the gateway's requests get the event loop)."""

STOP_CODES = {"cancelled": ("batch_cancelled", "the batch was cancelled before this request ran"),
              "expired": ("batch_expired", "this request could not be run before the completion window expired")}


def base_id(batch_id: str, line: BatchLine) -> str:
    """The id of an input line's completion (and its first job): ``<batch id>-<line number>``."""
    return f"{batch_id}-{line.number}"


class LeaseLost(Exception):
    """Another replica holds the batch's lease now: this one stops driving it."""


class _Tracked:
    """What a replica knows of a batch it drives: the lines without an output line, and its round over them.

    ``pending``: positions (0-based, in the stored list) with no output
    entry yet. ``numbers``/``jobs``: each line's number in the file and its
    job count, once this replica read the line (0 before). ``order`` and
    ``cursor``: the pending enqueued positions sorted when the current round
    began, and how far the round got.
    """

    def __init__(self, total: int, pending: set[int]) -> None:
        self.total, self.pending = total, pending
        self.numbers = array("I", [0]) * total
        self.jobs = array("I", [0]) * total
        self.order: list[int] = []
        self.cursor = 0
        self.enqueue_at = 0.0  # time.monotonic() before which enqueueing is not tried (the queue was full)

    def job_ids(self, batch_id: str, pos: int) -> list[str]:
        """The ids of the jobs of the line at ``pos`` (read already)."""
        return job_ids(f"{batch_id}-{self.numbers[pos]}", self.jobs[pos])

    def window(self, enqueued: int, budget: int) -> list[int]:
        """The round's next pending positions below ``enqueued``, up to ``budget`` jobs (a new round at its end)."""
        picked: list[int] = []
        jobs, renewed, wrap_at = 0, False, None
        while jobs < budget:
            if self.cursor >= len(self.order):
                if renewed:
                    break
                wrap_at = picked[0] if picked else None
                self.order, self.cursor, renewed = sorted(p for p in self.pending if p < enqueued), 0, True
                continue
            pos = self.order[self.cursor]
            if wrap_at is not None and pos >= wrap_at:
                break  # round the whole way: every pending line is in the window
            self.cursor += 1
            if pos in self.pending:
                picked.append(pos)
                jobs += self.jobs[pos] or 1
        return picked


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
            except LeaseLost:
                self._tracked.pop(batch_id, None)
                log.info("batch keeper: batch %s: another replica took its lease over", batch_id)

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
        await self._harvest(state, tracked, tracked.window(enqueued, READ_PER_PASS_JOBS), stop)
        if stop is not None:
            await self._stop(state, tracked, enqueued, stop)
        if not tracked.pending:
            await self._finish(state, stop)

    async def _let_go(self, batch_id: str) -> None:
        self._tracked.pop(batch_id, None)
        await store.release_lease(self.conn, batch_id, self.token)

    async def _hold(self, batch_id: str) -> None:
        """Renew the lease in a long walk; :class:`LeaseLost` if another replica took it."""
        if not await store.renew_lease(self.conn, batch_id, self.token, self.lease_ms):
            raise LeaseLost(batch_id)

    async def _track(self, state: BatchState) -> _Tracked:
        """Which of ``state``'s lines have no output line yet (from the done set; no line is read)."""
        total = state.count("total")
        done = await store.done_positions(self.conn, state.id)
        if len(done) < state.done:  # output entries without their positions (an older replica wrote them)
            done = set()
            for first in range(0, total, PAGE_LINES):
                ids = await store.custom_ids(self.conn, state.id, first, min(total, first + PAGE_LINES))
                flags = await store.harvested(self.conn, state.id, ids)
                done.update(first + i for i, flag in enumerate(flags) if flag)
                await self._hold(state.id)
        return _Tracked(total, set(range(total)) - done)

    async def _read_lines(self, batch_id: str, tracked: _Tracked, positions: Iterable[int]) -> dict[int, BatchLine]:
        """The stored lines at ``positions`` (one round trip), noting each one's number and job count."""
        raws = await store.lines_at(self.conn, batch_id, positions)
        lines = {pos: line_from_json(raw) for pos, raw in raws.items()}
        for pos, line in lines.items():
            tracked.numbers[pos], tracked.jobs[pos] = line.number, line.completion.num_jobs
        return lines

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
        budget, most = ENQUEUE_PER_PASS_JOBS, min(ENQUEUE_CHUNK_JOBS, self.settings.max_batch_size)
        while enqueued < tracked.total and budget > 0 and time.monotonic() >= tracked.enqueue_at:
            lines = await self._read_lines(state.id, tracked, range(enqueued, min(tracked.total, enqueued + most)))
            chunk: list[BatchLine] = []
            jobs = 0
            for pos in sorted(lines):
                if chunk and jobs + lines[pos].completion.num_jobs > most:
                    break
                chunk.append(lines[pos])
                jobs += lines[pos].completion.num_jobs
            requests = [r for line in chunk for r in line.requests(self.client.build_request, base_id(state.id, line))]
            try:
                await self.client.submit_batch(requests)
            except QueueFull:
                log.debug("batch keeper: batch %s: the queue is full; enqueueing again later", state.id)
                tracked.enqueue_at = time.monotonic() + QUEUE_FULL_BACKOFF_S
                break
            enqueued += len(chunk)
            budget -= jobs
            await self.conn.hset(keys.api_batch(state.id), "enqueued", enqueued)
        return enqueued

    async def _ended(self, batch_id: str, tracked: _Tracked, window: list[int]) -> list[int]:
        """The positions of ``window`` whose jobs all ended (one round trip: their rq statuses)."""
        async with self.conn.pipeline(transaction=False) as pipe:
            for pos in window:
                for job_id in tracked.job_ids(batch_id, pos):
                    pipe.hget(keys.rq_job_key(job_id), "status")
            states = iter(await pipe.execute())
        return [pos for pos in window if all([job_state(next(states)).is_terminal
                                              for _ in range(tracked.jobs[pos])])]

    async def _outcomes(self, batch_id: str, tracked: _Tracked,
                        positions: list[int]) -> dict[int, list[JobResult | TpqError | None]]:
        """Each ended line's job outcomes (None while one may still change): rq status and latest result entry."""
        async with self.conn.pipeline(transaction=False) as pipe:
            for pos in positions:
                for job_id in tracked.job_ids(batch_id, pos):
                    pipe.hget(keys.rq_job_key(job_id), "status")  # before the result, as in wait_result
                    pipe.xrevrange(keys.rq_result_key(job_id), count=1)
            replies = iter(await pipe.execute())
        outcomes: dict[int, list[JobResult | TpqError | None]] = {}
        for pos in positions:
            outcomes[pos] = []
            for job_id in tracked.job_ids(batch_id, pos):
                status, entries = next(replies), next(replies)
                watch = ResultWatch(job_id)
                watch.feed(entries)
                outcomes[pos].append(watch.verdict(job_state(status)))
        return outcomes

    async def _harvest(self, state: BatchState, tracked: _Tracked, window: list[int], stop: str | None) -> None:
        """Write the output line of every line of ``window`` whose jobs have all finished (a few at a time)."""
        await self._read_lines(state.id, tracked, [pos for pos in window if not tracked.jobs[pos]])
        ended = await self._ended(state.id, tracked, window)
        for first in range(0, len(ended), HARVEST_CHUNK_LINES):  # short stretches: the gateway's requests wait
            part = ended[first:first + HARVEST_CHUNK_LINES]
            outcomes = await self._outcomes(state.id, tracked, part)
            lines = await self._read_lines(state.id, tracked, part)
            items = []
            for pos in part:
                line, line_outcomes = lines[pos], outcomes[pos]
                if any(o is None for o in line_outcomes):
                    continue
                bid = base_id(state.id, line)
                if stop is not None and any(isinstance(o, JobCancelled) for o in line_outcomes):
                    data, failed = unrun_line(line.custom_id, bid, *STOP_CODES[stop]), True
                else:
                    data, failed = await self._output(line, bid, line_outcomes)  # type: ignore[arg-type]
                items.append(Harvest(pos, line.custom_id, {"line": line.number, "error": failed, "data": data},
                                     failed))
            written = await store.harvest(self.conn, state.id, items)
            tracked.pending.difference_update(item.position for item, w in zip(items, written) if w is not None)
            if None in written:
                log.warning("batch keeper: batch %s: Redis refused %d output lines; writing them again later",
                            state.id, written.count(None))

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
            positions = sorted(pos for pos in tracked.pending if pos < enqueued)
            conn, settings = self.client.sync_redis, self.settings
            for first in range(0, len(positions), PAGE_LINES):
                page = positions[first:first + PAGE_LINES]
                await self._read_lines(state.id, tracked, [pos for pos in page if not tracked.jobs[pos]])
                ids = [job_id for pos in page for job_id in tracked.job_ids(state.id, pos)]
                # on the client's own threads: its bounded synchronous pool is sized for them
                await self.client.run_sync(lambda ids=ids: [cancel_job(conn, settings, job_id) for job_id in ids])
                await self._hold(state.id)
            await self.conn.hset(keys.api_batch(state.id), "jobs_cancelled", "1")
        unrun = sorted(pos for pos in tracked.pending if pos >= enqueued)
        for first in range(0, len(unrun), PAGE_LINES):
            lines = await self._read_lines(state.id, tracked, unrun[first:first + PAGE_LINES])
            items = [Harvest(pos, line.custom_id, {"line": line.number, "error": True, "data": unrun_line(
                line.custom_id, base_id(state.id, line), *STOP_CODES[stop])}, True) for pos, line in lines.items()]
            written = await store.harvest(self.conn, state.id, items)
            tracked.pending.difference_update(item.position for item, w in zip(items, written) if w is not None)
            await self._hold(state.id)

    async def _finish(self, state: BatchState, stop: str | None) -> None:
        """Every line has its output line: write the files a page at a time, then move the batch to its final status."""
        batch_id, now = state.id, now_s()
        if stop is None and not await store.move(self.conn, batch_id, "finalizing", ["in_progress", "finalizing"],
                                                 now):
            return  # cancelled meanwhile: the next pass finishes it as cancelled
        part = uuid.uuid4().hex
        writers = {failed: FileWriter(self.conn, f"file-{batch_id}-{name}", f"{batch_id}_{name}.jsonl",
                                      "batch_output", part) for failed, name in ((False, "output"), (True, "error"))}
        counts = {False: 0, True: 0}
        async for page in store.output_pages(self.conn, batch_id, state.count("total"), PAGE_LINES):
            for failed, data in page:
                await writers[failed].write(data + b"\n")
                counts[failed] += 1
            await self._hold(batch_id)
        files = {f"{name}_file_id": (await writers[failed].commit())["id"]
                 for failed, name in ((False, "output"), (True, "error")) if counts[failed]}
        if files:
            await self.conn.hset(keys.api_batch(batch_id), mapping=files)
        final, from_ = {"cancelled": ("cancelled", ["cancelling"]), "expired": ("expired", ["in_progress"]),
                        None: ("completed", ["finalizing"])}[stop]
        if await store.move(self.conn, batch_id, final, from_, now):
            await store.close(self.conn, batch_id)
            await self._let_go(batch_id)
            log.info("batch %s %s: %d output lines, %d error lines", batch_id, final, counts[False], counts[True])
