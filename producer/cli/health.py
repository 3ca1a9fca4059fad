"""``tpq health``: is the deployment healthy? Exit 0 with ``OK: ...`` or 1 with ``FAIL: ...``, on one line.

A worker group fails the check when it is dead (a rank's heartbeat is
gone), hung (rank 0 holds jobs and its step has not advanced for
``--hang-after-s``, default ``TPQ_HANG_TIMEOUT_S``) or fenced (the
supervisor declared it dead or hung and it is being restarted); a group
still starting passes. Without ``--group`` or ``--supervisor`` it checks
every registered group, that a supervisor holds the lock, and that every
session shard has a live owner. With ``--gateway URL`` it asks an HTTP
gateway's ``/health`` instead (no Redis needed): healthy when it answers 200,
not when it answers 503 (no live group serves) or cannot be reached. Meant
for Docker and Kubernetes health checks and for scripts.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

import redis

from common import keys
from common.errors import TpqError
from common.groups import read_group_records, read_shard_map
from common.health import GroupHealth, judge_groups
from common.redis_conn import connect
from common.settings import Settings, get_settings
from producer.local_stack.stack_info import redis_url_for


def build_parser() -> argparse.ArgumentParser:
    """The ``tpq health`` argument parser."""
    parser = argparse.ArgumentParser(prog="tpq health", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", action="append", default=None, metavar="NAME",
                        help="check only this group (repeatable); it must be registered")
    parser.add_argument("--supervisor", action="store_true", help="check only that a supervisor holds the lock")
    parser.add_argument("--hang-after-s", type=float, default=None,
                        help="seconds without a step while holding jobs that make a group hung "
                             "(default: TPQ_HANG_TIMEOUT_S)")
    parser.add_argument("--gateway", default=None, metavar="URL",
                        help="check the HTTP gateway at URL (e.g. http://127.0.0.1:8000) through its /health")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="seconds to wait for the gateway (default 5)")
    return parser


def check_gateway(url: str, timeout_s: float) -> tuple[bool, str]:
    """``(healthy, one-line reason)`` from the gateway at ``url``: its ``GET /health``."""
    health_url = url.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health_url, timeout=timeout_s) as response:  # noqa: S310 - an operator's URL
            groups = json.loads(response.read() or b"{}").get("groups", {})
        return True, f"OK: gateway {url} serves ({len(groups)} group(s))"
    except urllib.error.HTTPError as e:
        try:
            reason = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            reason = e.reason
        return False, f"FAIL: gateway {url} answers {e.code}: {reason}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        return False, f"FAIL: gateway {url} cannot be reached: {getattr(e, 'reason', e)}"


def check(conn: redis.Redis, settings: Settings, groups: list[str] | None = None, *, supervisor_only: bool = False,
          hang_after_s: float | None = None, now: float | None = None) -> tuple[bool, str]:
    """``(healthy, one-line reason)`` for the deployment behind ``conn`` (see the module docstring)."""
    now = time.time() if now is None else now
    hang_after_s = settings.hang_timeout_s if hang_after_s is None else hang_after_s
    problems: list[str] = []
    fine: list[str] = []
    live: set[str] = set()
    if not supervisor_only:
        records = read_group_records(conn)
        verdicts = judge_groups(records, now=now, heartbeat_ttl_s=settings.heartbeat_ttl_s, hang_after_s=hang_after_s)
        names = groups or sorted(records)
        if not names:
            problems.append("no worker group is registered (start one with `tpq worker`, or `tpq up`)")
        for name in names:
            verdict = verdicts.get(name)
            if verdict is None:
                problems.append(f"group {name} is not registered (not started, still loading its model, or stopped)")
                continue
            if verdict.health is GroupHealth.LIVE:
                live.add(name)
            if verdict.health.ok:
                fine.append(f"group {name} {verdict.health.value}")
            else:
                problems.append(f"group {name} {verdict.health.value}: {verdict.reason}")
    if supervisor_only or not groups:
        if conn.exists(keys.supervisor_lock()):
            fine.append("supervisor active")
        else:
            problems.append("no supervisor holds the lock (is `tpq supervisor` running?)")
    if not supervisor_only and not groups:
        _epoch, shard_map = read_shard_map(conn)
        unowned = sum(1 for shard in range(settings.num_shards) if shard_map.get(shard) not in live)
        if unowned:
            problems.append(f"{unowned} of {settings.num_shards} session shards have no live owner")
        else:
            fine.append(f"{settings.num_shards}/{settings.num_shards} shards owned")
    if problems:
        return False, "FAIL: " + "; ".join(problems)
    return True, "OK: " + ", ".join(fine)


def main(argv: list[str]) -> int:
    """Entry point of ``tpq health``: prints one line, returns 0 (healthy) or 1 (not, or cannot tell)."""
    args = build_parser().parse_args(argv)
    if args.gateway is not None:
        healthy, line = check_gateway(args.gateway, args.timeout_s)
        print(line)
        return 0 if healthy else 1
    try:
        settings = get_settings()
        conn = connect(redis_url_for(settings, "health"), client_name="tpq-health", check=True, retries=1)
        try:
            healthy, line = check(conn, settings, args.group, supervisor_only=args.supervisor,
                                  hang_after_s=args.hang_after_s)
        finally:
            conn.close()
    except (TpqError, redis.RedisError) as exc:
        healthy, line = False, f"FAIL: {exc}"
    print(line)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
