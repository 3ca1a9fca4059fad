"""What the gateway reads about the worker groups: which models are served, and whether anything serves.

Each registered group is judged with the one health verdict
(:func:`common.health.judge_group`, as ``tpq health`` does); a group that
passes (live, or still starting) serves its registered ``model``. The
reading is synchronous (the groups' helpers take ``redis.Redis``): the
gateway runs :func:`read_deployment` in a worker thread.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis

from common import keys
from common.groups import FENCED_FIELD, GroupInfo, read_groups, read_heartbeats
from common.health import GroupVerdict, judge_group
from common.settings import Settings
from common.text import as_optional_text


@dataclass(frozen=True)
class Deployment:
    """The registered groups with their verdicts, as of one reading."""

    groups: dict[str, tuple[GroupInfo, GroupVerdict]] = field(default_factory=dict)

    @property
    def models(self) -> dict[str, int]:
        """Every model a passing group serves -> the Unix time (s) its earliest such group started."""
        served: dict[str, int] = {}
        for info, verdict in self.groups.values():
            if verdict.health.ok:
                started = int(info.started_at)
                served[info.model] = min(served.get(info.model, started), started)
        return served

    def unavailable_reason(self) -> str | None:
        """Why no group serves (None when one does)."""
        if self.models:
            return None
        if not self.groups:
            return "no worker group is registered (start one with `tpq worker`, or `tpq up`)"
        return "no worker group is live: " + "; ".join(
            f"group {name} {verdict.health.value}: {verdict.reason}" for name, (_, verdict) in self.groups.items())


def read_deployment(conn: redis.Redis, settings: Settings, now: float | None = None) -> Deployment:
    """Every registered group and its verdict (heartbeat TTL and hang timeout from ``settings``)."""
    now = time.time() if now is None else now
    infos = read_groups(conn)
    beats = read_heartbeats(conn)
    with conn.pipeline(transaction=False) as pipe:
        for name in infos:
            pipe.hget(keys.group_info(name), FENCED_FIELD)
        fences = {name: as_optional_text(raw) for name, raw in zip(infos, pipe.execute())}
    groups = {}
    for name, info in infos.items():
        verdict = judge_group(info, fences[name], [b for b in beats if b.group == name], now=now,
                              heartbeat_ttl_s=settings.heartbeat_ttl_s, hang_after_s=settings.hang_timeout_s)
        groups[name] = (info, verdict)
    return Deployment(groups)
