"""``GET /v1/ws``: many chat and completion requests over one WebSocket, each tagged with the client's id.

For chat UIs that hold one connection. The client sends JSON text messages:

- ``{"type": "chat.completions" | "completions", "id": ID, "body": {...}}``:
  a request whose body is what ``POST /v1/chat/completions`` (or
  ``/v1/completions``) takes; it is always streamed. ``ID`` is the
  client's own (a string, unique among its open requests on the socket).
- ``{"type": "cancel", "id": ID}``: stop that request and cancel its jobs.

The server answers each request with messages tagged with its ``ID``:
``{"id", "event_id", "data"}`` for every chunk (the same chunk objects the
SSE stream carries, ``event_id`` its ``id:`` line), then ``{"id", "done":
true}``; or ``{"id", "error": {...}}`` (OpenAI's error object) when the
request is refused or fails; ``{"id", "cancelled": true}`` after a cancel.
A message that is not understood gets an ``error`` with the ``id`` it gave
(or null). Requests run concurrently; the socket's API key (checked at the
handshake) applies to all of them, and each request is charged to its
rate limits as an HTTP request is (one request, its token estimate,
:func:`~producer.gateway.ratelimit.admit`): a refused one gets the
``rate_limit_exceeded`` error and the socket stays open. An error the HTTP
routes answer with ``Retry-After`` (a rate limit that refills, a full
queue: ``queue_full``) carries the same whole seconds in
``error.retry_after`` (absent from errors without a hint, such as a request
larger than the limit itself). A cancel that
arrives while its request is still being enqueued waits for the enqueue,
then cancels the jobs it made. A chunk's ``id`` is the completion's,
so a request cut off by a dropped socket can be resumed over HTTP
(``GET /v1/chat/completions/{id}/stream`` with ``Last-Event-ID``) within
``TPQ_HTTP_DISCONNECT_GRACE_S``.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect

from common.errors import JobNotFound, TpqError
from common.settings import Settings
from producer.gateway import ratelimit, records
from producer.gateway.completions import Completions
from producer.gateway.errors import APIError, bad_request, from_tpq_error
from producer.gateway.params import Completion, parse_chat, parse_completion
from producer.gateway.ratelimit import TokenCharge
from producer.gateway.records import CompletionRecord
from producer.gateway.responses import DONE
from producer.handles import AsyncJobHandle

log = logging.getLogger(__name__)

PARSERS = {"chat.completions": parse_chat, "completions": parse_completion}
MAX_OPEN_REQUESTS = 64
"""Most requests one socket may have running at once (a 429 error message beyond)."""
MAX_ID_CHARS = 128


def error_object(error: APIError) -> dict[str, Any]:
    """The ``error`` of a socket message: OpenAI's error object, plus ``retry_after`` (seconds, an int) when the
    HTTP answer would carry ``Retry-After``."""
    obj = error.body()["error"]
    retry_after = error.headers.get("Retry-After")
    if retry_after is not None:
        obj["retry_after"] = int(retry_after)
    return obj


class Socket:
    """One client's WebSocket: its running requests and their enqueues by client id, and a lock so messages
    never interleave."""

    def __init__(self, websocket: WebSocket, service: Completions, settings: Settings) -> None:
        self.websocket, self.service, self.settings = websocket, service, settings
        self.max_message_bytes = settings.http_max_body_bytes
        self.running: dict[str, asyncio.Task] = {}
        self.enqueues: dict[str, asyncio.Future] = {}  # a request's enqueue, once started: its record and handles
        self.streaming: set[str] = set()  # the requests whose stream began (it gives their jobs the grace)
        self._send_lock = asyncio.Lock()

    async def serve(self) -> None:
        """Take messages until the client leaves; then stop every request still running (their jobs get the
        disconnect grace, as a dropped SSE stream's do, those still being enqueued too)."""
        await self.websocket.accept()
        try:
            while True:
                raw = await self.websocket.receive_text()
                await self.take(raw)
        except WebSocketDisconnect:
            pass
        finally:
            unstreamed = [enqueue for request_id, enqueue in self.enqueues.items() if request_id not in self.streaming]
            for task in self.running.values():
                task.cancel()
            await asyncio.gather(*self.running.values(), return_exceptions=True)
            for enqueue in unstreamed:
                self.service.spawn(self._abandon(enqueue))

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.websocket.send_text(json.dumps(message, separators=(",", ":"), ensure_ascii=False))

    async def take(self, raw: str) -> None:
        """Act on one client message."""
        if len(raw.encode()) > self.max_message_bytes:
            await self.send({"id": None, "error": APIError(
                413, f"a message is at most {self.max_message_bytes} bytes (TPQ_HTTP_MAX_BODY_BYTES)",
                code="request_too_large").body()["error"]})
            return
        try:
            message = json.loads(raw)
        except ValueError as e:
            await self.send({"id": None, "error": bad_request(f"a message must be JSON: {e}").body()["error"]})
            return
        request_id = message.get("id") if isinstance(message, dict) else None
        try:
            kind = self._check(message)
        except APIError as error:
            await self.send({"id": request_id, "error": error_object(error)})
            return
        if kind == "cancel":
            await self.cancel(request_id)
            return
        task = asyncio.get_running_loop().create_task(self.run(request_id, kind, message["body"]))
        self.running[request_id] = task
        task.add_done_callback(lambda _: self.running.pop(request_id, None))

    def _check(self, message: Any) -> str:
        if not isinstance(message, dict):
            raise bad_request("a message must be a JSON object with type and id")
        kind, request_id = message.get("type"), message.get("id")
        if kind not in (*PARSERS, "cancel"):
            raise bad_request(f"type must be one of {', '.join([*PARSERS, 'cancel'])}; got {kind!r}", param="type")
        if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_ID_CHARS:
            raise bad_request(f"id must be a non-empty string of at most {MAX_ID_CHARS} characters", param="id")
        if kind == "cancel":
            return kind
        if request_id in self.running:
            raise bad_request(f"a request with id {request_id!r} is still running on this socket", param="id")
        if len(self.running) >= MAX_OPEN_REQUESTS:
            raise APIError(429, f"at most {MAX_OPEN_REQUESTS} requests may run at once on one socket",
                           code="too_many_requests")
        if not isinstance(message.get("body"), dict):
            raise bad_request("body must be the JSON object of the request", param="body")
        return kind

    async def run(self, request_id: str, kind: str, body: dict[str, Any]) -> None:
        """Serve one request: its chunks, then done; or its error."""
        try:
            completion = PARSERS[kind]({**body, "stream": True})
            completion, charge = await ratelimit.admit(self.websocket, completion, self.settings, requests=1)
            enqueue = asyncio.ensure_future(self._enqueue(completion, charge))
            self.enqueues[request_id] = enqueue
            # shielded: a cancel must not cut an enqueue short (its jobs would exist, unknown); it waits for it
            record, handles = await asyncio.shield(enqueue)
            stream = self.service.stream(record, handles, [0] * len(handles))
            self.streaming.add(request_id)
            async for data, event_id in stream.frames():
                if data == DONE:
                    await self.send({"id": request_id, "done": True})
                elif isinstance(data, dict) and "error" in data and "choices" not in data:
                    await self.send({"id": request_id, "error": data["error"]})
                else:
                    await self.send({"id": request_id, "event_id": event_id, "data": data})
        except asyncio.CancelledError:
            raise
        except APIError as error:
            await self.send({"id": request_id, "error": error_object(error)})
        except TpqError as error:
            await self.send({"id": request_id, "error": error_object(from_tpq_error(error))})
        except Exception as error:  # noqa: BLE001 - one request's failure must not end the socket
            log.exception("websocket request %s failed", request_id)
            await self.send({"id": request_id, "error": APIError(
                500, f"internal error ({type(error).__name__})").body()["error"]})
        finally:
            self.enqueues.pop(request_id, None)
            self.streaming.discard(request_id)

    async def _enqueue(self, completion: Completion,
                       charge: TokenCharge) -> tuple[CompletionRecord, list[AsyncJobHandle]]:
        """Enqueue ``completion``'s jobs; its tokens are given back if that fails (nothing was enqueued)."""
        async with charge.refunded_on_error():
            return await self.service.create(completion, session_header=None, idempotency_key=None)

    async def _abandon(self, enqueue: asyncio.Future) -> None:
        """The jobs of a request whose client left while they were being enqueued: cancelled after the
        disconnect grace, unless a stream attached to them meanwhile (a resume over HTTP)."""
        handles = await _enqueued(enqueue)
        if not handles:
            return
        record, _ = enqueue.result()
        await asyncio.sleep(self.settings.http_disconnect_grace_s)
        if await records.attached_count(self.service.client.redis, record.id):
            return
        log.info("completion %s: its WebSocket closed while it was enqueued; cancelling %d job(s)", record.id,
                 len(handles))
        for handle in handles:
            with contextlib.suppress(JobNotFound):
                await handle.cancel()

    async def cancel(self, request_id: str) -> None:
        """Stop request ``request_id`` and cancel its jobs now (no grace: the client asked), waiting for its
        enqueue first if it is in flight."""
        task, enqueue = self.running.get(request_id), self.enqueues.get(request_id)
        if task is None:
            await self.send({"id": request_id, "error": bad_request(
                f"no request with id {request_id!r} runs on this socket", param="id").body()["error"]})
            return
        task.cancel()  # before its enqueue started: it never starts; after: `enqueue` is it
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for handle in await _enqueued(enqueue):
            with contextlib.suppress(JobNotFound):
                await handle.cancel()
        await self.send({"id": request_id, "cancelled": True})


async def _enqueued(enqueue: asyncio.Future | None) -> list[AsyncJobHandle]:
    """The job handles an enqueue made, once it is over; none if there was none or it failed (nothing enqueued)."""
    if enqueue is None:
        return []
    await asyncio.wait([enqueue])  # its failure, if any, is its request's to answer
    if enqueue.cancelled() or enqueue.exception() is not None:
        return []
    return enqueue.result()[1]


def install(app: Any, settings: Settings) -> None:
    """Add ``GET /v1/ws`` to ``app`` (its service is ``app.state.completions``)."""

    @app.websocket("/v1/ws")
    async def websocket_requests(websocket: WebSocket) -> None:
        await Socket(websocket, websocket.app.state.completions, settings).serve()
