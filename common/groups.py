"""What worker groups tell the rest of tpqueue through Redis: registration, heartbeats, the shard map.

A worker group is one tensor-parallel model over ``tp`` ranks. Each time its
rank 0 starts it picks a fresh ``incarnation`` (a random hex id), registers
a :class:`GroupInfo` in ``keys.group_info(group)`` and adds the group to
``keys.groups_set()``. Every rank writes a :class:`Heartbeat` to
``keys.heartbeat(group, rank)`` every ``heartbeat_interval_s`` with a TTL of
``heartbeat_ttl_s``; an expired heartbeat means that rank is gone.

The supervisor (``router``) owns the shard map: ``keys.shard_map()`` is a
hash ``shard -> group`` and ``keys.shard_map_epoch()`` an integer it
increments on every change. To fence a dead or hung incarnation it writes
that incarnation into the group hash's ``fenced`` field; a rank 0 that finds
its own incarnation fenced stops taking work and exits, so its launcher
restarts the group with a new incarnation.

These helpers take a ``redis.Redis`` (or a pipeline, for the writers) and do
no retries of their own: the connection's retry policy applies.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import time
from typing import Any, NamedTuple

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common import keys
from common.text import as_optional_text

FENCED_FIELD = "fenced"


class Heartbeat(BaseModel):
    """One rank's liveness record. ``step`` counts forward passes this rank ran; ``in_flight`` is
    the number of jobs the group holds (rank 0 knows it and the engine figures; other ranks write 0)."""

    model_config = ConfigDict(extra="forbid")

    group: str
    rank: int = Field(ge=0)
    incarnation: str
    pid: int
    host: str
    step: int = Field(ge=0)
    in_flight: int = Field(0, ge=0)
    ts: float = Field(description="Unix time the heartbeat was written.")
    tokens: int = Field(0, ge=0, description="Tokens the group sampled since this incarnation started (rank 0).")
    running: int = Field(0, ge=0, description="Sequences in the engine's running batch (rank 0).")
    waiting: int = Field(0, ge=0, description="Sequences waiting in the engine's scheduler (rank 0).")
    steps_per_s: float = Field(0.0, ge=0, description="Steps per second over the last few heartbeats.")
    tokens_per_s: float = Field(0.0, ge=0, description="Sampled tokens per second over the last few heartbeats.")
    stalled_s: float = Field(
        0.0, ge=0, description="Seconds ``step`` has not advanced while the group held jobs (0 if it advances or idles).")


class GroupInfo(BaseModel):
    """The static facts of one running incarnation of a worker group."""

    model_config = ConfigDict(extra="forbid")

    group: str
    incarnation: str
    tp: int = Field(ge=1)
    model: str
    host: str
    pid: int = Field(description="Rank 0's process id.")
    worker_name: str = Field(description="Rank 0's rq worker name (rq info shows it).")
    started_at: float = Field(description="Unix time this incarnation started.")
    metrics_port: int | None = None


def new_incarnation() -> str:
    """A fresh random id for one start of a worker group."""
    return secrets.token_hex(6)


def hostname() -> str:
    return socket.gethostname()


def make_heartbeat(group: str, rank: int, incarnation: str, step: int, in_flight: int = 0, **load: Any) -> Heartbeat:
    """A heartbeat of this process, stamped now; ``load``: the optional figures (``tokens``, ``running``,
    ``waiting``, ``steps_per_s``, ``tokens_per_s``, ``stalled_s``)."""
    return Heartbeat(group=group, rank=rank, incarnation=incarnation, pid=os.getpid(), host=hostname(),
                     step=step, in_flight=in_flight, ts=time.time(), **load)


def write_heartbeat(conn: Any, heartbeat: Heartbeat, ttl_s: float) -> None:
    """SET the heartbeat key with a TTL of ``ttl_s`` seconds (``conn`` may be a pipeline)."""
    conn.set(keys.heartbeat(heartbeat.group, heartbeat.rank), heartbeat.model_dump_json(),
             px=max(1, int(ttl_s * 1000)))


def read_heartbeats(conn: redis.Redis, group: str | None = None) -> list[Heartbeat]:
    """Every live heartbeat (of one group, or of all), sorted by group and rank. Unreadable ones are skipped."""
    found = list(conn.scan_iter(match=keys.heartbeat_pattern(group), count=500))
    if not found:
        return []
    beats = []
    for raw in conn.mget(found):
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            beats.append(Heartbeat.model_validate_json(raw))
        except ValidationError:
            continue
    return sorted(beats, key=lambda b: (b.group, b.rank))


def register_group(conn: redis.Redis, info: GroupInfo) -> None:
    """Publish ``info`` as the group's current incarnation (clearing any fence) and list the group."""
    fields = {k: json.dumps(v) for k, v in info.model_dump(mode="json").items()}
    with conn.pipeline(transaction=True) as pipe:
        pipe.delete(keys.group_info(info.group))
        pipe.hset(keys.group_info(info.group), mapping=fields)
        pipe.sadd(keys.groups_set(), info.group)
        pipe.execute()


def unregister_group(conn: redis.Redis, group: str, incarnation: str, tp: int) -> None:
    """Remove a cleanly stopped incarnation: its registration (if still its own) and its heartbeats."""
    info = read_group(conn, group)
    with conn.pipeline(transaction=True) as pipe:
        if info is not None and info.incarnation == incarnation:
            pipe.delete(keys.group_info(group))
            pipe.srem(keys.groups_set(), group)
        for rank in range(tp):
            pipe.delete(keys.heartbeat(group, rank))
        pipe.execute()


def read_group(conn: redis.Redis, group: str) -> GroupInfo | None:
    """The registered incarnation of ``group``, or None (not registered, or unreadable)."""
    raw = conn.hgetall(keys.group_info(group))
    return _parse_group(raw)


def read_groups(conn: redis.Redis) -> dict[str, GroupInfo]:
    """Every registered group's info, by name."""
    names = sorted(n.decode() if isinstance(n, bytes) else n for n in conn.smembers(keys.groups_set()))
    with conn.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(keys.group_info(name))
        raws = pipe.execute()
    groups = {}
    for name, raw in zip(names, raws):
        info = _parse_group(raw)
        if info is not None:
            groups[name] = info
    return groups


def _parse_group(raw: dict) -> GroupInfo | None:
    if not raw:
        return None
    data = {}
    for k, v in raw.items():
        name = k.decode() if isinstance(k, bytes) else k
        if name == FENCED_FIELD:
            continue
        try:
            data[name] = json.loads(v)
        except ValueError:
            return None
    try:
        return GroupInfo.model_validate(data)
    except ValidationError:
        return None


def fence(conn: Any, group: str, incarnation: str) -> None:
    """Mark ``incarnation`` of ``group`` as fenced: it must take no more work (``conn`` may be a pipeline)."""
    conn.hset(keys.group_info(group), FENCED_FIELD, incarnation)


def is_fenced(conn: redis.Redis, group: str, incarnation: str) -> bool:
    """Whether the supervisor fenced ``incarnation`` (or another incarnation has taken the group's name)."""
    with conn.pipeline(transaction=False) as pipe:
        pipe.hget(keys.group_info(group), FENCED_FIELD)
        pipe.hget(keys.group_info(group), "incarnation")
        fenced, current = pipe.execute()
    if as_optional_text(fenced) == incarnation:
        return True
    if current is not None:
        current_value = json.loads(current)
        return current_value != incarnation
    return False


class GroupRecord(NamedTuple):
    """What Redis holds of one registered group: its registration, its fence, its ranks' live heartbeats."""

    info: GroupInfo
    fenced: str | None  # the incarnation in the fence field, if any
    beats: list[Heartbeat]


def read_group_records(conn: redis.Redis) -> dict[str, GroupRecord]:
    """Every registered group's :class:`GroupRecord`: what a health verdict is judged from (few round trips)."""
    infos = read_groups(conn)
    beats = read_heartbeats(conn)
    with conn.pipeline(transaction=False) as pipe:
        for name in infos:
            pipe.hget(keys.group_info(name), FENCED_FIELD)
        fences = pipe.execute()
    return {name: GroupRecord(info, as_optional_text(fenced), [b for b in beats if b.group == name])
            for (name, info), fenced in zip(infos.items(), fences)}


def read_shard_map(conn: redis.Redis) -> tuple[int, dict[int, str]]:
    """``(epoch, {shard: group})`` as the supervisor last wrote it; ``(0, {})`` before it ever did."""
    with conn.pipeline(transaction=True) as pipe:
        pipe.get(keys.shard_map_epoch())
        pipe.hgetall(keys.shard_map())
        epoch, raw = pipe.execute()
    owners = {}
    for shard, group in raw.items():
        shard_text = shard.decode() if isinstance(shard, bytes) else shard
        if shard_text.isdigit():
            owners[int(shard_text)] = group.decode() if isinstance(group, bytes) else group
    return int(epoch or 0), owners


def shards_of(shard_map: dict[int, str], group: str) -> list[int]:
    """The shards ``group`` owns in ``shard_map``, ascending."""
    return sorted(s for s, g in shard_map.items() if g == group)
