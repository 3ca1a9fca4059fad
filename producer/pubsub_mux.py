"""Many asyncio token streams over one pub/sub connection: :class:`PubSubHub` and its :class:`Subscription` s.

A stream reader (:class:`producer.stream_core.ReaderCore`) asks its
``pubsub_conn`` for ``pubsub()``, then ``subscribe(channel)``,
``get_message(timeout=...)`` and ``aclose()``, as on a redis-py pub/sub.
Given a hub instead of a connection, it gets a :class:`Subscription` that
answers the same calls, so the reader's protocol is unchanged while one
connection carries every channel of every stream of the client:

- a channel is SUBSCRIBEd once, when its first subscription asks, and
  UNSUBSCRIBEd when its last one closes;
- one reader task takes the connection's messages and puts each on the
  queue of every subscription of its channel; the ``subscribe``
  confirmation reaches the subscriptions that asked before it arrived, and
  one that joins a confirmed channel gets its own confirmation at once (it
  was registered first, so it misses nothing published after it);
- when the connection drops, every subscription's next ``get_message``
  raises the error (the reader then replays the log and subscribes again,
  on a fresh connection), and the hub starts over;
- a subscription holds at most :data:`MAX_BUFFERED` messages for a reader
  that does not keep up (an HTTP client slower than generation); the hub
  drops what comes past that, and the reader reads it from the durable log
  instead: it sees the gap at its next message, or at its idle re-read
  when none comes. So a slow client costs a bounded buffer, not memory
  without end, and still gets every token.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio

from common.text import as_text

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 1.0
"""Seconds the reader task waits for a message before it looks again (whether the hub still uses it)."""
MAX_BUFFERED = 1024
"""Messages one subscription holds for its reader; past it the hub drops them (the reader reads them from the log)."""


class _Channel:
    """A channel's subscriptions, and whether Redis confirmed the SUBSCRIBE."""

    __slots__ = ("members", "confirmed")

    def __init__(self) -> None:
        self.members: set[Subscription] = set()
        self.confirmed = False


class PubSubHub:
    """One pub/sub connection (``conn.pubsub()``, made on first use) shared by many :class:`Subscription` s."""

    def __init__(self, conn: redis.asyncio.Redis) -> None:
        self._conn = conn
        self._pubsub: Any = None
        self._reader: asyncio.Task | None = None
        self._channels: dict[str, _Channel] = {}
        self._lock = asyncio.Lock()

    def pubsub(self) -> Subscription:
        """A new subscription (the reader core's ``pubsub_conn.pubsub()``)."""
        return Subscription(self)

    @property
    def channels(self) -> int:
        """How many channels are subscribed now."""
        return len(self._channels)

    async def aclose(self) -> None:
        """Drop every subscription (each then sees a closed connection) and close the connection."""
        await self._reset(ConnectionError("the client was closed"))

    async def _join(self, member: Subscription, channel: str) -> None:
        try:
            async with self._lock:
                entry = self._channels.get(channel)
                if entry is not None:
                    entry.members.add(member)
                    if entry.confirmed:
                        member._queue.put_nowait({"type": "subscribe", "channel": channel, "data": 1})
                    return
                entry = self._channels[channel] = _Channel()
                entry.members.add(member)
                if self._pubsub is None:
                    self._pubsub = self._conn.pubsub()
                pubsub = self._pubsub
                await pubsub.subscribe(channel)
                if pubsub is not self._pubsub:  # the connection broke meanwhile: the reader task reset the hub
                    raise redis.ConnectionError("the shared pub/sub connection was lost while subscribing")
                if self._reader is None or self._reader.done():
                    self._reader = asyncio.get_running_loop().create_task(self._read(pubsub))
        except redis.RedisError as e:
            await self._reset(e)
            raise

    async def _leave(self, member: Subscription, channel: str) -> None:
        async with self._lock:
            entry = self._channels.get(channel)
            if entry is None or member not in entry.members:
                return
            entry.members.discard(member)
            if entry.members:
                return
            del self._channels[channel]
            if self._pubsub is not None:
                with contextlib.suppress(Exception):  # a broken connection: the reader task resets the hub
                    await self._pubsub.unsubscribe(channel)

    async def _read(self, pubsub: Any) -> None:
        """The reader task: dispatch every message of ``pubsub`` until it breaks or the hub drops it."""
        try:
            while pubsub is self._pubsub:
                message = await pubsub.get_message(timeout=READ_TIMEOUT_S)
                if message is not None:
                    self._dispatch(message)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every subscription hears of it and reconnects
            log.info("pub/sub hub: connection lost (%s: %s); %d channel(s) will resubscribe",
                     type(e).__name__, e, len(self._channels))
            if pubsub is self._pubsub:
                await self._reset(e, reader_done=True)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        entry = self._channels.get(as_text(message.get("channel") or b""))
        if entry is None:
            return
        if kind == "subscribe":
            if entry.confirmed:
                return  # an earlier SUBSCRIBE's confirmation: its members already have theirs
            entry.confirmed = True
        if kind == "subscribe":
            for member in entry.members:
                member._queue.put_nowait(message)
        elif kind == "message":
            for member in entry.members:
                member._offer(message)

    async def _reset(self, error: BaseException, *, reader_done: bool = False) -> None:
        """Fail every subscription with ``error``, forget every channel, close the connection."""
        pubsub, reader, self._pubsub, self._reader = self._pubsub, self._reader, None, None
        channels, self._channels = self._channels, {}
        for entry in channels.values():
            for member in entry.members:
                member._queue.put_nowait(error)
        if reader is not None and not reader_done:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()


class Subscription:
    """One reader's view of the hub: the calls of a redis-py asyncio pub/sub that the reader core makes."""

    __slots__ = ("_hub", "_channel", "_queue", "dropped")

    def __init__(self, hub: PubSubHub) -> None:
        self._hub = hub
        self._channel: str | None = None
        self._queue: asyncio.Queue = asyncio.Queue()  # confirmations and errors always go in; messages up to a bound
        self.dropped = 0  # messages dropped while MAX_BUFFERED were waiting

    @property
    def buffered(self) -> int:
        """Messages waiting for the reader."""
        return self._queue.qsize()

    def _offer(self, message: dict[str, Any]) -> None:
        """Queue a channel message unless :data:`MAX_BUFFERED` wait already (the log keeps it for the reader)."""
        if self._queue.qsize() < MAX_BUFFERED:
            self._queue.put_nowait(message)
        else:
            self.dropped += 1

    async def subscribe(self, channel: str) -> None:
        """Join ``channel``; its confirmation arrives as a ``subscribe`` message from :meth:`get_message`."""
        if self._channel is not None:
            raise RuntimeError(f"this subscription is already on {self._channel!r}; make another for {channel!r}")
        self._channel = channel
        await self._hub._join(self, channel)

    async def get_message(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next ``subscribe`` or ``message`` of the channel, None after ``timeout``; raises a lost connection."""
        if not self._queue.empty():  # the common case in a burst: no timer, no task for wait_for
            item = self._queue.get_nowait()
        else:
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                return None
        if isinstance(item, BaseException):
            raise redis.ConnectionError(f"the shared pub/sub connection was lost: {item}") from item
        return item

    async def aclose(self) -> None:
        """Leave the channel (the hub unsubscribes it when no other subscription is on it)."""
        channel, self._channel = self._channel, None
        if channel is not None:
            await self._hub._leave(self, channel)
