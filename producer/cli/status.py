"""``tpq status``: what the deployment is doing now: groups, ranks, shards, queues, jobs (``--json`` for tools).

Steps/s and tok/s come from rank 0's heartbeat, which averages them over
its last ~10 s; a group's health is judged as ``tpq health`` judges it.
"""
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
from common.groups import read_group_records, read_shard_map, shards_of
from common.health import GroupHealth, judge_groups
from common.redis_conn import connect, redact_url
from common.settings import Settings, get_settings
from producer.local_stack.stack_info import redis_url_for


def collect_status(conn: redis.Redis, settings: Settings) -> dict[str, Any]:
    """Everything ``tpq status`` shows, as JSON-safe data (no secrets: the URL is redacted by the caller)."""
    now = time.time()
    records = read_group_records(conn)
    verdicts = judge_groups(records, now=now, heartbeat_ttl_s=settings.heartbeat_ttl_s,
                            hang_after_s=settings.hang_timeout_s)
    epoch, shard_map = read_shard_map(conn)
    group_rows = []
    for name, (info, _fenced, beats) in records.items():
        ranks = [b for b in beats if b.incarnation == info.incarnation]
        rank0 = next((b for b in ranks if b.rank == 0), None)
        verdict = verdicts[name]
        group_rows.append({
            "group": name, "incarnation": info.incarnation, "state": "up" if verdict.health.processes_up else "down",
            "health": verdict.health.value, "health_reason": verdict.reason, "tp": info.tp,
            "model": info.model, "host": info.host, "worker": info.worker_name, "metrics_port": info.metrics_port,
            "ranks": [{"rank": b.rank, "pid": b.pid, "host": b.host, "step": b.step,
                       "heartbeat_age_s": round(now - b.ts, 3)} for b in ranks],
            "step": rank0.step if rank0 else None, "in_flight": rank0.in_flight if rank0 else None,
            "steps_per_s": rank0.steps_per_s if rank0 else None,
            "tokens_per_s": rank0.tokens_per_s if rank0 else None,
            "running": rank0.running if rank0 else None, "waiting": rank0.waiting if rank0 else None,
            "tokens": rank0.tokens if rank0 else None,
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
        "supervisor": {"active": bool(conn.exists(keys.supervisor_lock()))},
        "shard_map": {"epoch": epoch, "assigned": len(shard_map), "num_shards": settings.num_shards},
        "groups": group_rows,
        "queues": {name: depth for name, depth in depths.items() if depth},
        "jobs": jobs,
    }


def render(status: dict[str, Any], redis_url: str) -> str:
    """The status as a human-readable table."""
    lines = [f"Redis {redact_url(redis_url)}   shard map epoch {status['shard_map']['epoch']}: "
             f"{status['shard_map']['assigned']}/{status['shard_map']['num_shards']} shards assigned"]
    lines[0] += "   supervisor " + ("active" if status["supervisor"]["active"] else "NOT RUNNING")
    header = (f"{'GROUP':<12} {'HEALTH':<8} {'TP':>2} {'SHARDS':>6} {'STEP':>9} {'STEPS/S':>7} {'TOK/S':>8} "
              f"{'RUN':>4} {'WAIT':>4} {'JOBS':>4} {'HB AGE':>6}  RANKS (pid@host)")
    lines += ["", header]
    for g in status["groups"]:
        age = max((r["heartbeat_age_s"] for r in g["ranks"]), default=None)
        ranks = " ".join(f"{r['rank']}({r['pid']}@{r['host']})" for r in g["ranks"]) or "-"
        lines.append(f"{g['group']:<12} {g['health']:<8} {g['tp']:>2} {g['shards']:>6} {_dash(g['step']):>9} "
                     f"{_rate(g['steps_per_s']):>7} {_rate(g['tokens_per_s']):>8} {_dash(g['running']):>4} "
                     f"{_dash(g['waiting']):>4} {_dash(g['in_flight']):>4} {_dash(age and f'{age:.1f}s'):>6}  {ranks}")
        if g["health_reason"] and g["health"] != GroupHealth.LIVE.value:
            lines.append(f"{'':<12} {g['health_reason']}")
    if not status["groups"]:
        lines.append("(no worker group registered: start one with `tpq worker` or `tpq up`)")
    queues = status["queues"]
    lines += ["", "queues: " + (", ".join(f"{q}={n}" for q, n in sorted(queues.items())) if queues else "all empty")]
    j = status["jobs"]
    lines.append(f"jobs: {j['queued']} queued, {j['started']} running, {j['finished']} finished, {j['failed']} failed")
    return "\n".join(lines)


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def build_parser() -> argparse.ArgumentParser:
    """The ``tpq status`` argument parser."""
    parser = argparse.ArgumentParser(prog="tpq status", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
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
