"""``tpq status``: what the deployment is doing now: groups, ranks, shards, queues, jobs (``--json`` for tools)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import redis
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from common import keys
from common.errors import TpqError
from common.groups import read_groups, read_heartbeats, read_shard_map, shards_of
from common.redis_conn import connect, redact_url
from common.settings import Settings, get_settings
from common.stack_info import redis_url_for


def collect_status(conn: redis.Redis, settings: Settings) -> dict[str, Any]:
    """Everything ``tpq status`` shows, as JSON-safe data (no secrets: the URL is redacted by the caller)."""
    now = time.time()
    groups = read_groups(conn)
    beats = read_heartbeats(conn)
    epoch, shard_map = read_shard_map(conn)
    fenced = {name: conn.hget(keys.group_info(name), "fenced") for name in groups}
    group_rows = []
    for name, info in groups.items():
        ranks = [b for b in beats if b.group == name and b.incarnation == info.incarnation]
        rank0 = next((b for b in ranks if b.rank == 0), None)
        alive = len(ranks) == info.tp and not (fenced[name] and fenced[name].decode() == info.incarnation)
        group_rows.append({
            "group": name, "incarnation": info.incarnation, "state": "up" if alive else "down", "tp": info.tp,
            "model": info.model, "host": info.host, "worker": info.worker_name,
            "ranks": [{"rank": b.rank, "pid": b.pid, "step": b.step, "heartbeat_age_s": round(now - b.ts, 3)}
                      for b in ranks],
            "step": rank0.step if rank0 else None, "in_flight": rank0.in_flight if rank0 else None,
            "shards": len(shards_of(shard_map, name)), "uptime_s": round(now - info.started_at, 1),
        })
    queue_names = keys.shard_queue_names(settings.num_shards) + [keys.BATCH_QUEUE]
    with conn.pipeline(transaction=False) as pipe:
        for name in queue_names:
            pipe.llen(keys.rq_queue_key(name))
        depths = dict(zip(queue_names, pipe.execute()))
    jobs = {"queued": sum(depths.values()), "started": 0, "finished": 0, "failed": 0}
    for name in queue_names:
        jobs["started"] += StartedJobRegistry(name, connection=conn).count
        jobs["finished"] += FinishedJobRegistry(name, connection=conn).count
        jobs["failed"] += FailedJobRegistry(name, connection=conn).count
    return {
        "shard_map": {"epoch": epoch, "assigned": len(shard_map), "num_shards": settings.num_shards},
        "groups": group_rows,
        "queues": {name: depth for name, depth in depths.items() if depth},
        "jobs": jobs,
    }


def render(status: dict[str, Any], redis_url: str) -> str:
    """The status as a human-readable table."""
    lines = [f"Redis {redact_url(redis_url)}   shard map epoch {status['shard_map']['epoch']}: "
             f"{status['shard_map']['assigned']}/{status['shard_map']['num_shards']} shards assigned"]
    header = f"{'GROUP':<12} {'STATE':<5} {'TP':>2} {'SHARDS':>6} {'STEP':>9} {'IN FLIGHT':>9} {'HB AGE':>7}  RANKS (pid)"
    lines += ["", header]
    for g in status["groups"]:
        age = max((r["heartbeat_age_s"] for r in g["ranks"]), default=None)
        ranks = " ".join(f"{r['rank']}({r['pid']})" for r in g["ranks"]) or "-"
        lines.append(f"{g['group']:<12} {g['state']:<5} {g['tp']:>2} {g['shards']:>6} {_dash(g['step']):>9} "
                     f"{_dash(g['in_flight']):>9} {_dash(age and f'{age:.1f}s'):>7}  {ranks}")
    if not status["groups"]:
        lines.append("(no worker group registered: start one with `tpq worker` or `tpq up`)")
    queues = status["queues"]
    lines += ["", "queues: " + (", ".join(f"{q}={n}" for q, n in sorted(queues.items())) if queues else "queues: all empty")]
    j = status["jobs"]
    lines.append(f"jobs: {j['queued']} queued, {j['started']} running, {j['finished']} finished, {j['failed']} failed")
    return "\n".join(lines)


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tpq status", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
        url = redis_url_for(settings, "status")
        conn = connect(url, check=True)
        status = collect_status(conn, settings)
    except (TpqError, redis.RedisError) as exc:
        print(f"tpq status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else render(status, url))
    return 0
