"""Many asyncio result waits over one connection: :class:`ResultWaiter`.

``result()`` (:func:`producer.job_state.wait_result`) reads a job's status
and result stream, then blocks up to a second in XREAD on that stream and
reads again. On an asyncio client every such blocking read goes through
the waiter: one task XREADs the result streams of every job awaited now,
in one call that blocks at most :data:`BLOCK_S`, and hands each waiter the
entries after its own last id (or nothing, once its block time is over).
A wait that starts while a read is in flight joins the next one, so it is
heard at most :data:`BLOCK_S` late; 500 awaited results cost one
connection, not 500 held by blocked commands.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from common.text import as_text
from producer.job_state import xread_items

BLOCK_S = 0.05
"""Seconds one XREAD of the waiter blocks: the most a wait that began during it is heard late."""


def _entry_id(entry_id: Any) -> tuple[int, int]:
    milliseconds, _, sequence = as_text(entry_id).partition("-")
    return int(milliseconds), int(sequence or 0)


class _Wait:
    """One blocking read: the stream, the id it reads after, until when, and where its answer goes."""

    __slots__ = ("key", "after", "after_id", "until", "answer")

    def __init__(self, key: str, after: Any, until: float, answer: asyncio.Future) -> None:
        self.key, self.after_id, self.after = key, after, _entry_id(after)
        self.until, self.answer = until, answer


class ResultWaiter:
    """Blocking XREADs of single result streams, carried out together on ``conn`` (a connection of its own)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._waits: dict[str, list[_Wait]] = {}
        self._task: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        """How many reads wait now."""
        return sum(len(waits) for waits in self._waits.values())

    async def xread(self, streams: dict[str, Any], block: int) -> list[tuple[Any, list[Any]]]:
        """What ``XREAD BLOCK block STREAMS key id`` would answer for the one stream in ``streams``."""
        [(key, after)] = streams.items()
        loop = asyncio.get_running_loop()
        wait = _Wait(key, after, time.monotonic() + block / 1000, loop.create_future())
        self._waits.setdefault(key, []).append(wait)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        try:
            return await wait.answer
        finally:
            self._forget(wait)

    async def aclose(self) -> None:
        """Stop the reading task (waits then in progress get ``ConnectionError``) and close the connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001 - it was cancelled
                pass
        self._fail_all(ConnectionError("the client was closed"))
        await self._conn.aclose()

    def _forget(self, wait: _Wait) -> None:
        waits = self._waits.get(wait.key)
        if waits is not None and wait in waits:
            waits.remove(wait)
            if not waits:
                del self._waits[wait.key]

    async def _run(self) -> None:
        try:
            while self._waits:
                now = time.monotonic()
                for wait in [w for waits in self._waits.values() for w in waits if w.until <= now]:
                    self._answer(wait, [])
                if not self._waits:
                    return
                soonest = min(w.until for waits in self._waits.values() for w in waits)
                block_ms = max(1, int(min(BLOCK_S, soonest - now) * 1000))
                streams = {key: min(waits, key=lambda w: w.after).after_id for key, waits in self._waits.items()}
                for key, entries in xread_items(await self._conn.xread(streams, block=block_ms)):
                    self._deliver(as_text(key), entries)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every wait raises it, as its own XREAD would have
            self._fail_all(e)

    def _deliver(self, key: str, entries: list[Any]) -> None:
        for wait in list(self._waits.get(key, ())):
            newer = [entry for entry in entries if _entry_id(entry[0]) > wait.after]
            if newer:
                self._answer(wait, [(key, newer)])

    def _answer(self, wait: _Wait, reply: list[Any]) -> None:
        self._forget(wait)
        if not wait.answer.done():
            wait.answer.set_result(reply)

    def _fail_all(self, error: BaseException) -> None:
        waits = [w for waits in self._waits.values() for w in waits]
        self._waits.clear()
        for wait in waits:
            if not wait.answer.done():
                wait.answer.set_exception(error)
