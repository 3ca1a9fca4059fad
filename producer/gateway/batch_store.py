"""HTTP Batch API batches as kept in Redis: the record, its status changes, its output lines, its lease.

A batch is one hash (``keys.api_batch``): ``spec`` (what never changes,
JSON), ``status``, one ``<status>_at`` field per status reached,
``total``/``completed``/``failed`` (request counts), ``enqueued`` (input
lines enqueued so far), ``errors`` (validation failures, JSON),
``output_file_id``/``error_file_id``. Its checked input lines are a list
(``keys.api_batch_lines``); its output a hash from ``custom_id`` to the
output line (``keys.api_batch_output``), each written once by
:data:`_HARVEST` (HGET then HSET in one script: a line is never written or
counted twice, whoever writes it and whatever crashed). A status changes
only from an expected one (:data:`_MOVE`), so a cancel and a keeper's
finish cannot overwrite each other. The replica that drives a batch holds
its lease (``keys.api_batch_lease``, SET NX PX, renewed by
:data:`_RENEW`). Scripts use only commands the README's ACL user has.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from common import keys
from common.errors import InvalidRequestError
from producer.gateway.errors import not_found

STATUSES = ("validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled")
FINAL = frozenset({"failed", "completed", "expired", "cancelled"})
COMPLETION_WINDOW_S = 24 * 3600

_HARVEST = """
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


async def harvest(conn: Any, batch_id: str, custom_id: str, entry: dict[str, Any], failed: bool) -> bool:
    """Write one output entry (``{line, error, data}``) unless its ``custom_id`` has one; whether it was written."""
    counter = "failed" if failed else "completed"
    return bool(await _script(conn, _HARVEST, [keys.api_batch_output(batch_id), keys.api_batch(batch_id)],
                              [custom_id, json.dumps(entry, separators=(",", ":")), counter]))


async def harvested(conn: Any, batch_id: str, custom_ids: list[str]) -> list[bool]:
    """Whether each ``custom_id`` already has an output entry."""
    out: list[bool] = []
    for first in range(0, len(custom_ids), 1000):
        chunk = custom_ids[first:first + 1000]
        out += [v is not None for v in await conn.hmget(keys.api_batch_output(batch_id), chunk)]
    return out


async def output_entries(conn: Any, batch_id: str) -> list[dict[str, Any]]:
    """Every output entry, in input line order."""
    raw = await conn.hgetall(keys.api_batch_output(batch_id))
    return sorted((json.loads(v) for v in raw.values()), key=lambda e: e["line"])


async def lines(conn: Any, batch_id: str, start: int, stop: int) -> list[bytes]:
    """Stored input lines ``start .. stop - 1`` (0-based positions in the list)."""
    return await conn.lrange(keys.api_batch_lines(batch_id), start, stop - 1)


async def take_lease(conn: Any, batch_id: str, token: str, ttl_ms: int) -> str | None:
    """``"new"`` when this token took the lease now, ``"renewed"`` when it held it, None when another holds it."""
    key = keys.api_batch_lease(batch_id)
    if await conn.set(key, token, nx=True, px=ttl_ms):
        return "new"
    return "renewed" if await _script(conn, _RENEW, [key], [token, ttl_ms]) else None


async def release_lease(conn: Any, batch_id: str, token: str) -> None:
    """Drop the lease if this token holds it."""
    await _script(conn, _RELEASE, [keys.api_batch_lease(batch_id)], [token])


async def close(conn: Any, batch_id: str) -> None:
    """A final batch: out of the open set, its lines and output hash dropped (they are in its files now)."""
    async with conn.pipeline(transaction=True) as pipe:
        pipe.srem(keys.api_batches_open(), batch_id)
        pipe.delete(keys.api_batch_lines(batch_id), keys.api_batch_output(batch_id))
        await pipe.execute()
