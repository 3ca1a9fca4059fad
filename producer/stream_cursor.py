"""The ordering of one job's token stream: :class:`StreamCursor`, free of Redis and of I/O.

A reader offers it every message it gets, from pub/sub (fast, but a message
can be duplicated, or missed while a connection is down) and from the
durable token log (the truth) alike; the cursor hands out each token event
once, in index order, and says when a gap must be filled from the log.
"""
from __future__ import annotations

from collections.abc import Iterable

from common.errors import InvalidRequestError
from common.jobs import StreamMessage
from common.results import StreamEnd, TokenEvent
from common.token_log import position_of

MAX_EARLY = 4096
"""Messages beyond a gap a cursor holds at most (the log fills the gap and brings the rest again)."""


class StreamCursor:
    """Orders and de-duplicates one job's stream messages, from pub/sub and the log alike.

    :meth:`offer` returns the token events that became deliverable, in index
    order, each exactly once. A message at a position already delivered is
    dropped; one beyond the next position is held back (``waiting`` is then
    True: read the log from :attr:`next_position`). The first
    :class:`StreamEnd` at the next position ends the stream (:attr:`end`).
    """

    __slots__ = ("job_id", "_next", "_early", "_end")

    def __init__(self, job_id: str, start: int = 0) -> None:
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise InvalidRequestError(f"start must be a token index >= 0, got {start!r}")
        self.job_id = job_id
        self._next = start
        self._early: dict[int, StreamMessage] = {}
        self._end: StreamEnd | None = None

    @property
    def next_position(self) -> int:
        """The index of the next token to deliver (the number delivered so far, from 0)."""
        return self._next

    @property
    def end(self) -> StreamEnd | None:
        """The stream's end record once reached in order, else None."""
        return self._end

    @property
    def waiting(self) -> bool:
        """True when messages beyond a gap are held: the gap must be filled from the log."""
        return bool(self._early) and self._end is None

    def offer(self, message: StreamMessage, *, from_log: bool = False) -> list[TokenEvent]:
        """Take one message; return the token events now deliverable, in order."""
        if self._end is not None or message.request_id != self.job_id:
            return []
        position = position_of(message)
        if position < self._next:
            return []
        if position > self._next:
            if (from_log or position not in self._early) and len(self._early) < MAX_EARLY:
                self._early[position] = message  # the log's copy wins over pub/sub's
            return []
        return self._advance(message)

    def offer_all(self, messages: Iterable[StreamMessage], *, from_log: bool = False) -> list[TokenEvent]:
        """Take many messages; all token events that became deliverable, in order.

        With ``from_log`` every message replaces a pub/sub copy held for the
        same position before any is delivered: where the two differ (a
        fenced worker still publishing), the log's copy is the one delivered.
        """
        if not from_log:
            return [event for message in messages for event in self.offer(message)]
        if self._end is not None:
            return []
        for message in messages:
            position = position_of(message)
            if message.request_id == self.job_id and position >= self._next:
                self._early[position] = message
        return self._advance(self._early.pop(self._next, None))

    def _advance(self, message: StreamMessage | None) -> list[TokenEvent]:
        ready: list[TokenEvent] = []
        while message is not None:
            if isinstance(message, StreamEnd):
                self._end = message
                self._early.clear()
                break
            ready.append(message)
            self._next += 1
            message = self._early.pop(self._next, None)
        return ready
