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

from common.groups import GroupInfo, read_group_records
from common.health import GroupVerdict, judge_groups
from common.settings import Settings


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
    records = read_group_records(conn)
    verdicts = judge_groups(records, now=now, heartbeat_ttl_s=settings.heartbeat_ttl_s,
                            hang_after_s=settings.hang_timeout_s)
    return Deployment({name: (record.info, verdicts[name]) for name, record in records.items()})
