"""The Batch API's files: ``/v1/files`` routes over file objects kept in Redis, so every replica sees them.

A file is one hash (``keys.api_file``): ``object`` (OpenAI's file object,
JSON) and either ``content`` (the bytes: uploads) or ``part`` (the name of
the list of chunks that holds them, ``keys.api_file_part``: a batch's
output files, written a chunk at a time by a :class:`FileWriter` and made
visible whole by its ``commit``; downloads stream them a chunk at a time). ``keys.api_files`` lists the ids, scored
by minus the creation time in microseconds, so ascending order is newest
first (the order OpenAI lists in). Uploads are multipart (``file`` and
``purpose``, as the SDK's ``client.files.create`` sends them), only
``purpose=batch``, at most ``TPQ_HTTP_MAX_FILE_BYTES`` (413 beyond: at once
for a declared ``Content-Length`` past it, else as soon as the body read
passes it, chunked uploads included, never after spooling it whole) and
:data:`~producer.gateway.batch_lines.MAX_LINES` lines. A batch's output and error
files are files of purpose ``batch_output`` (:func:`store_file`).
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.types import Message, Receive

from common import keys
from common.errors import InvalidRequestError
from common.settings import Settings
from producer.gateway.batch_lines import MAX_LINES
from producer.gateway.errors import APIError, bad_request, not_found

MULTIPART_SLACK_BYTES = 64 * 1024
"""Bytes a multipart upload may carry beyond its file's bound (boundaries, headers, the purpose field)."""
MAX_LIST_LIMIT = 10_000
CHUNK_BYTES = 1 << 20
"""Bytes a :class:`FileWriter` gathers before it writes them as one chunk."""
PART_TTL_S = 3600
"""Seconds an uncommitted part lives after its last write (a writer that died leaves nothing for long)."""

# KEYS[1]: the file's hash, KEYS[2]: the part, KEYS[3]: the listing. ARGV: the object (JSON), the part's name, the
# file id, the listing score. The first commit of a file wins: a later writer's part (the same lines, written again
# by a replica that took over) is dropped, so a download already streaming the first part is never cut short.
_COMMIT = """
if redis.call('HGET', KEYS[1], 'object') then
  redis.call('DEL', KEYS[2])
  return 0
end
redis.call('HSET', KEYS[1], 'object', ARGV[1], 'part', ARGV[2])
redis.call('PERSIST', KEYS[2])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
return 1
"""


def now_us() -> int:
    """The Unix time in microseconds (the listing score: distinct, and exact in a double)."""
    return time.time_ns() // 1000


async def store_file(conn: Any, content: bytes, filename: str, purpose: str, file_id: str | None = None) -> dict:
    """Store a file (a new id unless ``file_id`` is given: storing it again replaces it); its object."""
    created_us = now_us()
    file_id = keys.validate_file_id(file_id or "file-" + uuid.uuid4().hex)
    obj = _object(file_id, len(content), created_us, filename, purpose)
    async with conn.pipeline(transaction=True) as pipe:
        pipe.hset(keys.api_file(file_id), mapping={"object": json.dumps(obj), "content": content})
        pipe.zadd(keys.api_files(), {file_id: -created_us})
        await pipe.execute()
    return obj


class FileWriter:
    """A file written a chunk at a time (bounded memory, whatever its size), visible to readers only once committed.

    Its chunks go to a part of its own (``keys.api_file_part(file_id,
    part)``, expiring after :data:`PART_TTL_S` until committed), so two
    writers of one file never mix theirs; :meth:`commit` makes the first
    complete part the file's content, atomically.
    """

    def __init__(self, conn: Any, file_id: str, filename: str, purpose: str, part: str) -> None:
        self.conn, self.file_id, self.filename, self.purpose, self.part = conn, file_id, filename, purpose, part
        self.key = keys.api_file_part(file_id, part)
        self.size = 0
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._started = False

    async def write(self, data: bytes) -> None:
        """Add ``data`` at the end (written to Redis once :data:`CHUNK_BYTES` have gathered)."""
        self._buffer.append(data)
        self._buffered += len(data)
        self.size += len(data)
        if self._buffered >= CHUNK_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if not self._buffer:
            return
        chunk = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        async with self.conn.pipeline(transaction=True) as pipe:
            if not self._started:
                pipe.delete(self.key)  # a part this writer's name left before (never, with a fresh name)
                self._started = True
            pipe.rpush(self.key, chunk)
            pipe.expire(self.key, PART_TTL_S)
            await pipe.execute()

    async def commit(self) -> dict:
        """Make what was written the file's content (unless a writer committed it first); its object."""
        await self._flush()
        created_us = now_us()
        obj = _object(self.file_id, self.size, created_us, self.filename, self.purpose)
        await self.conn.register_script(_COMMIT)(
            keys=[keys.api_file(self.file_id), self.key, keys.api_files()],
            args=[json.dumps(obj), self.part, self.file_id, -created_us])
        return obj


def _object(file_id: str, size: int, created_us: int, filename: str, purpose: str) -> dict:
    return {"id": file_id, "object": "file", "bytes": size, "created_at": created_us // 1_000_000,
            "filename": filename, "purpose": purpose, "status": "processed", "expires_at": None,
            "status_details": None}


async def file_object(conn: Any, file_id: str) -> dict:
    """The object of file ``file_id``; 404 when there is none."""
    try:
        raw = await conn.hget(keys.api_file(file_id), "object")
    except InvalidRequestError:
        raw = None
    if raw is None:
        raise not_found(f"no file {file_id!r} (never uploaded, or deleted)", param="file_id")
    return json.loads(raw)


async def _content_or_part(conn: Any, file_id: str) -> tuple[bytes | None, str | None]:
    """File ``file_id``'s ``content`` (an upload) or the name of its ``part`` (written in chunks); 404 for neither."""
    await file_object(conn, file_id)
    content, part = await conn.hmget(keys.api_file(file_id), "content", "part")
    if content is None and part is None:
        raise not_found(f"file {file_id!r} has no content (deleted meanwhile)", param="file_id")
    return (bytes(content) if content is not None else None), (_text(part) if part is not None else None)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def file_content(conn: Any, file_id: str) -> bytes:
    """The bytes of file ``file_id`` (all of them, in memory); 404 when there is none."""
    content, part = await _content_or_part(conn, file_id)
    if content is not None:
        return content
    return b"".join(await conn.lrange(keys.api_file_part(file_id, part), 0, -1))


async def file_chunks(conn: Any, file_id: str) -> AsyncIterator[bytes]:
    """The bytes of file ``file_id``, a chunk (at most about :data:`CHUNK_BYTES`) at a time; 404 when there is none.

    The first chunk is read before this returns, so a missing file is a 404, not a broken stream.
    """
    content, part = await _content_or_part(conn, file_id)
    if content is not None:
        first, key = content, None
    else:
        key = keys.api_file_part(file_id, part)  # type: ignore[arg-type]
        first = await conn.lindex(key, 0) or b""

    async def chunks() -> AsyncIterator[bytes]:
        yield bytes(first)
        index = 1
        while key is not None and (chunk := await conn.lindex(key, index)) is not None:
            yield bytes(chunk)
            index += 1

    return chunks()


async def page(conn: Any, index_key: str, after: str | None, limit: int,
               newest_first: bool = True) -> tuple[list[str], bool]:
    """Up to ``limit`` ids of a listing sorted set after the id ``after``; and whether more follow."""
    low, high = "-inf", "+inf"
    if after:
        score = await conn.zscore(index_key, after)
        if score is None:
            raise bad_request(f"after: no such id {after!r} in this listing", param="after")
        low, high = (f"({score}", "+inf") if newest_first else ("-inf", f"({score}")
    start, end = (low, high) if newest_first else (high, low)
    ids = await conn.zrange(index_key, start, end, byscore=True, desc=not newest_first, offset=0, num=limit + 1)
    ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
    return ids[:limit], len(ids) > limit


def list_limit(request: Request, default: int, most: int) -> int:
    """The ``limit`` query parameter: a whole number in ``1 .. most``; 400 otherwise."""
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise bad_request(f"limit must be a whole number from 1 to {most}, got {raw!r}", param="limit")
    return int(raw)


def list_body(data: list[dict], has_more: bool) -> dict:
    """OpenAI's cursor page: ``{object: "list", data, first_id, last_id, has_more}``."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def _too_large(size: int, limit: int, what: str = "file") -> APIError:
    return APIError(413, f"the {what} is {size} bytes or more; a file of at most {limit} bytes is accepted "
                         "(TPQ_HTTP_MAX_FILE_BYTES)", param="file", code="file_too_large")


def bounded_receive(receive: Receive, most: int, limit: int) -> Receive:
    """``receive`` that refuses (413) a request body as soon as more than ``most`` bytes of it arrived."""
    received = 0

    async def receiving() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > most:
                raise _too_large(received, limit, "upload")
        return message

    return receiving


async def _upload(request: Request, limit: int) -> tuple[bytes, str, str]:
    """The uploaded file's bytes, its name and the purpose, from a multipart body."""
    most = limit + MULTIPART_SLACK_BYTES
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > most:
        raise _too_large(int(declared), limit, "upload")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_request("upload the file as multipart/form-data with fields file and purpose", param="file")
    request = Request(request.scope, bounded_receive(request.receive, most, limit))  # chunked: no length to check
    async with request.form(max_files=1, max_fields=8) as form:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise bad_request("the upload has no file field", param="file")
        if purpose != "batch":
            raise bad_request(f"purpose must be \"batch\" (the only purpose served), got {purpose!r}",
                              param="purpose")
        content = await upload.read(limit + 1)
        if len(content) > limit:
            raise _too_large(len(content), limit)
        return content, upload.filename or "upload.jsonl", purpose


def _check_batch_file(content: bytes) -> None:
    """Refuse a batch file that cannot be one (not UTF-8, too many lines); its lines are checked by a batch."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"a batch file must be UTF-8 JSONL: {e}", param="file", code="invalid_file") from None
    count = sum(1 for line in text.splitlines() if line.strip())
    if count > MAX_LINES:
        raise bad_request(f"the file holds {count} lines; at most {MAX_LINES} are allowed", param="file",
                          code="too_many_lines")


def router(settings: Settings) -> APIRouter:
    """``POST/GET /v1/files``, ``GET/DELETE /v1/files/{id}``, ``GET /v1/files/{id}/content``."""
    routes = APIRouter()

    def conn_of(request: Request) -> Any:
        return request.app.state.completions.client.redis

    @routes.post("/v1/files")
    async def create_file(request: Request) -> JSONResponse:
        content, filename, purpose = await _upload(request, settings.http_max_file_bytes)
        _check_batch_file(content)
        return JSONResponse(await store_file(conn_of(request), content, filename, purpose))

    @routes.get("/v1/files")
    async def list_files(request: Request) -> JSONResponse:
        conn, params = conn_of(request), request.query_params
        order = params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise bad_request(f"order must be \"asc\" or \"desc\", got {order!r}", param="order")
        limit = list_limit(request, MAX_LIST_LIMIT, MAX_LIST_LIMIT)
        purpose = params.get("purpose")
        ids, has_more = await page(conn, keys.api_files(), params.get("after"), limit, newest_first=order == "desc")
        async with conn.pipeline(transaction=False) as pipe:
            for file_id in ids:
                pipe.hget(keys.api_file(file_id), "object")
            objects = [json.loads(raw) for raw in await pipe.execute() if raw is not None]  # None: deleted meanwhile
        data = [o for o in objects if purpose is None or o["purpose"] == purpose]
        return JSONResponse(list_body(data, has_more))

    @routes.get("/v1/files/{file_id}")
    async def retrieve_file(request: Request, file_id: str) -> JSONResponse:
        return JSONResponse(await file_object(conn_of(request), file_id))

    @routes.get("/v1/files/{file_id}/content", response_class=Response,
                responses={200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes"}})
    async def retrieve_content(request: Request, file_id: str) -> Response:
        conn = conn_of(request)
        size = (await file_object(conn, file_id))["bytes"]
        return StreamingResponse(await file_chunks(conn, file_id), media_type="application/octet-stream",
                                 headers={"content-length": str(size)})

    @routes.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str) -> JSONResponse:
        conn = conn_of(request)
        await file_object(conn, file_id)
        part = await conn.hget(keys.api_file(file_id), "part")
        async with conn.pipeline(transaction=True) as pipe:
            pipe.delete(keys.api_file(file_id))
            if part is not None:
                pipe.delete(keys.api_file_part(file_id, _text(part)))
            pipe.zrem(keys.api_files(), file_id)
            await pipe.execute()
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    return routes
