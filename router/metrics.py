"""The supervisor's /metrics: its recovery counters, and what Redis says while it holds the supervisor lock.

Both are read when Prometheus scrapes, on the HTTP server's thread with its
own Redis connection; the supervisor's passes do no metrics work beyond the
event counters of ``common.metrics`` (jobs it requeued or failed). Only the
supervisor holding the lock reports Redis' state, so a standby beside it
does not double the queue depths in a ``sum()``.
"""
from __future__ import annotations

import redis

from common.metrics import (
    MetricsServer,
    RedisState,
    Sample,
    SnapshotCollector,
    SupervisorState,
    redis_state_samples,
    serve_metrics,
)
from common.settings import Settings
from router.supervisor import Supervisor


def supervisor_samples(supervisor: Supervisor) -> list[Sample]:
    """The :class:`SupervisorState` samples: the supervisor's counters (plain attributes) now."""
    dead_only = supervisor.groups_declared_dead - supervisor.groups_declared_hung
    return [
        (SupervisorState.LEADER, [], 1 if supervisor.is_leader else 0),
        (SupervisorState.DECLARED, ["dead"], dead_only),
        (SupervisorState.DECLARED, ["hung"], supervisor.groups_declared_hung),
        (SupervisorState.REASSIGNMENTS, [], supervisor.shard_reassignments),
        (SupervisorState.MAP_WRITES, [], supervisor.shard_map_writes),
        (SupervisorState.EXPIRED_STARTED, [], supervisor.expired_jobs_cleaned),
    ]


def leader_redis_samples(supervisor: Supervisor, conn: redis.Redis, settings: Settings) -> list[Sample]:
    """:func:`common.metrics.redis_state_samples` while ``supervisor`` leads; ``tpq_redis_up`` 0 if Redis fails."""
    if not supervisor.is_leader:
        return []
    try:
        samples = redis_state_samples(conn, settings.num_shards, settings.heartbeat_ttl_s, settings.hang_timeout_s)
    except redis.RedisError:
        return [(RedisState.UP, [], 0)]
    return [(RedisState.UP, [], 1), *samples]


def serve_supervisor_metrics(port: int, settings: Settings, supervisor: Supervisor,
                             conn: redis.Redis) -> MetricsServer | None:
    """Serve the supervisor's metrics on ``settings.metrics_host:port`` (None when off or the port is taken)."""
    collectors = [
        SnapshotCollector(SupervisorState.ALL, lambda: supervisor_samples(supervisor)),
        SnapshotCollector(RedisState.ALL, lambda: leader_redis_samples(supervisor, conn, settings)),
    ]
    return serve_metrics(port, settings.metrics_host, collectors, what=f"supervisor {supervisor.owner_id}")
