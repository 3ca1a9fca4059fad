"""HTTP Batch API batches as kept in Redis: the record, its status changes, its output lines, its lease.

A batch is one hash (``keys.api_batch``): ``spec`` (what never changes,
JSON), ``status``, one ``<status>_at`` field per status reached,
``total``/``completed``/``failed`` (request counts), ``enqueued`` (input
lines enqueued so far), ``errors`` (validation failures, JSON),
``output_file_id``/``error_file_id``. Its checked input lines are a list
(``keys.api_batch_lines``); its output a hash from ``custom_id`` to the
output line (``keys.api_batch_output``), each written once by
:data:`_HARVEST` (HGET then HSET in one script: a line is never written or
counted twice, whoever writes it and whatever crashed), which also adds the
line's position to ``keys.api_batch_done`` (so that a replica taking a
batch over learns which lines are done without reading them all). A status
changes only from an expected one (:data:`_MOVE`), so a cancel and a
keeper's finish cannot overwrite each other. The replica that drives a batch holds
its lease (``keys.api_batch_lease``, SET NX PX, renewed by
:data:`_RENEW`). Scripts use only commands the README's ACL user has.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from common import keys
from common.errors import InvalidRequestError
from producer.gateway.errors import not_found

STATUSES = ("validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled")
FINAL = frozenset({"failed", "completed", "expired", "cancelled"})
COMPLETION_WINDOW_S = 24 * 3600

# KEYS: the output hash, the batch's hash, its done set. ARGV: custom_id, the entry, the counter, the position.
_HARVEST = """
redis.call('SADD', KEYS[3], ARGV[4])
if redis.call('HGET', KEYS[1], ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
return 1
"""
_MOVE = """
local status = redis.call('HGET', KEYS[1], 'status')
for i = 3, 2 + tonumber(ARGV[2]) do
  if status == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[1] .. '_at', ARGV[3 + tonumber(ARGV[2])])
    return 1
  end
end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _script(conn: Any, source: str, script_keys: list[str], args: list[Any]) -> Any:
    """Run a Lua script by EVALSHA (loaded with SCRIPT LOAD when Redis lacks it: no EVAL)."""
    return conn.register_script(source)(keys=script_keys, args=args)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class BatchState:
    """One batch as read from its hash."""

    spec: dict[str, Any]
    fields: dict[str, str]

    @property
    def id(self) -> str:
        return self.spec["id"]

    @property
    def status(self) -> str:
        return self.fields["status"]

    def count(self, name: str) -> int:
        """An integer field (``total``, ``completed``, ``failed``, ``enqueued``); 0 when unset."""
        return int(self.fields.get(name, 0))

    @property
    def done(self) -> int:
        """Lines with an output line (completed or failed)."""
        return self.count("completed") + self.count("failed")

    def at(self, status: str) -> int | None:
        raw = self.fields.get(f"{status}_at")
        return int(raw) if raw is not None else None

    def as_object(self) -> dict[str, Any]:
        """OpenAI's batch object."""
        errors = json.loads(self.fields["errors"]) if "errors" in self.fields else None
        return {**{k: self.spec[k] for k in ("id", "endpoint", "input_file_id", "completion_window", "created_at",
                                             "expires_at", "metadata")},
                "object": "batch", "status": self.status,
                "errors": {"object": "list", "data": errors} if errors is not None else None,
                "output_file_id": self.fields.get("output_file_id"), "error_file_id": self.fields.get("error_file_id"),
                **{f"{s}_at": self.at(s) for s in STATUSES if s != "validating"},
                "request_counts": {"total": self.count("total"), "completed": self.count("completed"),
                                   "failed": self.count("failed")}}


def new_spec(batch_id: str, endpoint: str, input_file_id: str, metadata: dict | None, now: int) -> dict[str, Any]:
    """What never changes about a batch."""
    return {"id": batch_id, "endpoint": endpoint, "input_file_id": input_file_id, "completion_window": "24h",
            "created_at": now, "expires_at": now + COMPLETION_WINDOW_S, "metadata": metadata}


async def create(conn: Any, spec: dict[str, Any], *, lines: list[str], errors: list[dict] | None) -> BatchState:
    """Store a new batch: ``failed`` with ``errors``, else ``in_progress`` with its lines (one transaction)."""
    now = spec["created_at"]
    fields: dict[str, Any] = {"spec": json.dumps(spec), "total": len(lines), "completed": 0, "failed": 0,
                              "enqueued": 0}
    if errors:
        fields.update(status="failed", failed_at=now, errors=json.dumps(errors), total=0)
    else:
        fields.update(status="in_progress", in_progress_at=now)
    batch_id = spec["id"]
    async with conn.pipeline(transaction=True) as pipe:
        for first in range(0, len(lines), 1000):
            pipe.rpush(keys.api_batch_lines(batch_id), *lines[first:first + 1000])
        pipe.hset(keys.api_batch(batch_id), mapping=fields)
        pipe.zadd(keys.api_batches(), {batch_id: -(time.time_ns() // 1000)})
        if not errors:
            pipe.sadd(keys.api_batches_open(), batch_id)
        await pipe.execute()
    return BatchState(spec, {k: str(v) for k, v in fields.items() if k != "spec"})


async def load(conn: Any, batch_id: str) -> BatchState | None:
    """The batch ``batch_id``; None when there is none (or the id cannot be one)."""
    try:
        raw = await conn.hgetall(keys.api_batch(batch_id))
    except InvalidRequestError:
        return None
    if not raw or b"spec" not in raw:
        return None
    fields = {_text(k): _text(v) for k, v in raw.items()}
    return BatchState(json.loads(fields.pop("spec")), fields)


async def load_or_404(conn: Any, batch_id: str) -> BatchState:
    """The batch ``batch_id``; 404 when there is none."""
    state = await load(conn, batch_id)
    if state is None:
        raise not_found(f"no batch {batch_id!r}", param="batch_id")
    return state


async def move(conn: Any, batch_id: str, to: str, from_: Iterable[str], now: int) -> bool:
    """Set the status to ``to`` (and ``<to>_at``) if it is one of ``from_`` now; whether it was."""
    expected = list(from_)
    return bool(await _script(conn, _MOVE, [keys.api_batch(batch_id)], [to, len(expected), *expected, now]))


@dataclass(frozen=True)
class Harvest:
    """One output entry to write: the line's position (0-based) and ``custom_id``, the entry, whether it failed."""

    position: int
    custom_id: str
    entry: dict[str, Any]
    failed: bool


async def harvest(conn: Any, batch_id: str, items: list[Harvest]) -> list[bool | None]:
    """Write each output entry unless its ``custom_id`` has one (one round trip for them all).

    For each item: True if written now, False if it was there already (the
    line is done either way), None if Redis refused the script (it lost its
    scripts meanwhile: try that line again later).
    """
    if not items:
        return []
    sha = await conn.script_load(_HARVEST)  # EVALSHA in a pipeline: redis-py's own loader needs SCRIPT EXISTS
    script_keys = [keys.api_batch_output(batch_id), keys.api_batch(batch_id), keys.api_batch_done(batch_id)]
    async with conn.pipeline(transaction=False) as pipe:
        for item in items:
            entry = json.dumps(item.entry, separators=(",", ":"), ensure_ascii=False)  # read by entry_data
            pipe.evalsha(sha, 3, *script_keys, item.custom_id, entry,
                         "failed" if item.failed else "completed", item.position)
        replies = await pipe.execute(raise_on_error=False)
    return [None if isinstance(r, Exception) else bool(r) for r in replies]


async def done_positions(conn: Any, batch_id: str) -> set[int]:
    """The positions of the lines that have an output entry (as their harvest recorded them)."""
    return {int(raw) for raw in await conn.smembers(keys.api_batch_done(batch_id))}


async def harvested(conn: Any, batch_id: str, custom_ids: list[str]) -> list[bool]:
    """Whether each ``custom_id`` already has an output entry."""
    out: list[bool] = []
    for first in range(0, len(custom_ids), 1000):
        chunk = custom_ids[first:first + 1000]
        out += [v is not None for v in await conn.hmget(keys.api_batch_output(batch_id), chunk)]
    return out


# What BatchLine.as_json and harvest() write first, read without decoding the rest (else: json.loads).
_LINE_HEAD = re.compile(rb'\{"n":\d+,"custom_id":"([^"\\]*)",')
_ENTRY_HEAD = re.compile(rb'\{"line":\d+,"error":(true|false),"data":')


def _custom_id(raw: bytes) -> str:
    head = _LINE_HEAD.match(raw)
    return head.group(1).decode() if head else json.loads(raw)["custom_id"]


def entry_data(raw: bytes) -> tuple[bool, bytes]:
    """An output entry as stored: whether it is an error line, and its output line (JSON, no newline)."""
    head = _ENTRY_HEAD.match(raw)
    if head and raw.endswith(b"}"):
        return head.group(1) == b"true", raw[head.end():-1]
    entry = json.loads(raw)
    return bool(entry["error"]), json.dumps(entry["data"], separators=(",", ":"), ensure_ascii=False).encode()


async def custom_ids(conn: Any, batch_id: str, start: int, stop: int) -> list[str]:
    """The ``custom_id`` of the stored input lines ``start .. stop - 1``."""
    return [_custom_id(raw) for raw in await lines(conn, batch_id, start, stop)]


async def output_pages(conn: Any, batch_id: str, total: int,
                       page: int = 1000) -> AsyncIterator[list[tuple[bool, bytes]]]:
    """The output entries in line order, as :func:`entry_data` reads them: ``page`` lines (2 round trips) at a time."""
    for first in range(0, total, page):
        ids = await custom_ids(conn, batch_id, first, min(total, first + page))
        raws = await conn.hmget(keys.api_batch_output(batch_id), ids) if ids else []
        yield [entry_data(raw) for raw in raws if raw is not None]


async def lines(conn: Any, batch_id: str, start: int, stop: int) -> list[bytes]:
    """Stored input lines ``start .. stop - 1`` (0-based positions in the list)."""
    return await conn.lrange(keys.api_batch_lines(batch_id), start, stop - 1)


def runs(positions: Iterable[int]) -> list[tuple[int, int]]:
    """Positions, sorted, as ``(start, stop)`` runs of consecutive ones."""
    out: list[tuple[int, int]] = []
    for pos in sorted(positions):
        if out and out[-1][1] == pos:
            out[-1] = (out[-1][0], pos + 1)
        else:
            out.append((pos, pos + 1))
    return out


async def lines_at(conn: Any, batch_id: str, positions: Iterable[int]) -> dict[int, bytes]:
    """The stored input lines at ``positions``, by position (one round trip: an LRANGE per run of them)."""
    spans = runs(positions)
    if not spans:
        return {}
    async with conn.pipeline(transaction=False) as pipe:
        for start, stop in spans:
            pipe.lrange(keys.api_batch_lines(batch_id), start, stop - 1)
        replies = await pipe.execute()
    return {start + offset: raw for (start, _stop), raws in zip(spans, replies) for offset, raw in enumerate(raws)}


async def take_lease(conn: Any, batch_id: str, token: str, ttl_ms: int) -> str | None:
    """``"new"`` when this token took the lease now, ``"renewed"`` when it held it, None when another holds it."""
    key = keys.api_batch_lease(batch_id)
    if await conn.set(key, token, nx=True, px=ttl_ms):
        return "new"
    return "renewed" if await renew_lease(conn, batch_id, token, ttl_ms) else None


async def renew_lease(conn: Any, batch_id: str, token: str, ttl_ms: int) -> bool:
    """Extend the lease if this token holds it; whether it does."""
    return bool(await _script(conn, _RENEW, [keys.api_batch_lease(batch_id)], [token, ttl_ms]))


async def release_lease(conn: Any, batch_id: str, token: str) -> None:
    """Drop the lease if this token holds it."""
    await _script(conn, _RELEASE, [keys.api_batch_lease(batch_id)], [token])


async def close(conn: Any, batch_id: str) -> None:
    """A final batch: out of the open set, its lines, output hash and done set dropped (they are in its files now)."""
    async with conn.pipeline(transaction=True) as pipe:
        pipe.srem(keys.api_batches_open(), batch_id)
        pipe.delete(keys.api_batch_lines(batch_id), keys.api_batch_output(batch_id), keys.api_batch_done(batch_id))
        await pipe.execute()
