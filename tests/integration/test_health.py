"""tpq health and tpq status --json against a real redis-server, with groups written through the group protocol.

A group here is what a worker group writes (common.groups: registration,
heartbeats) and what a supervisor writes (the lock, the shard map); a hung
group is one whose rank 0 keeps heartbeating a frozen step with jobs in
flight, which is exactly what a stuck decode loop produces. The heartbeat
thread's own stall and rate reporting is tested at the end.
"""
from __future__ import annotations

import json
import time

import pytest

from common import keys
from common.groups import GroupInfo, Heartbeat, fence, make_heartbeat, register_group, write_heartbeat
from common.health import GroupHealth, judge_group
from common.redis_conn import connect
from common.settings import get_settings
from common.heartbeat import HeartbeatSpec, HeartbeatThread
from producer.cli import health as health_cli
from producer.cli import status as status_cli
from router.shard_map import write_shard_map

NUM_SHARDS = 4
TTL_S = 30.0


@pytest.fixture
def env(redis_url, monkeypatch):
    monkeypatch.setenv("TPQ_REDIS_URL", redis_url)
    monkeypatch.setenv("TPQ_NUM_SHARDS", str(NUM_SHARDS))
    monkeypatch.setenv("TPQ_HEARTBEAT_TTL_S", str(TTL_S))
    monkeypatch.setenv("TPQ_HANG_TIMEOUT_S", "20")
    conn = connect(redis_url)
    yield conn
    conn.close()


def start_group(conn, group: str = "g0", tp: int = 2, incarnation: str = "inc1", **rank0_load) -> None:
    """Register ``group`` and write a heartbeat for each rank (rank 0 with ``rank0_load``)."""
    register_group(conn, GroupInfo(group=group, incarnation=incarnation, tp=tp, model="tiny", host="h", pid=1,
                                   worker_name=f"tpq-{group}-{incarnation}", started_at=time.time() - 60,
                                   metrics_port=9461))
    for rank in range(tp):
        load = rank0_load if rank == 0 else {}
        write_heartbeat(conn, make_heartbeat(group, rank, incarnation, step=load.pop("step", 100), **load), TTL_S)


def start_supervisor(conn, owners: dict[int, str]) -> None:
    conn.set(keys.supervisor_lock(), "supervisor-test", px=60_000)
    assert write_shard_map(conn, owners, 0) is not None


def health(capsys, *args: str) -> tuple[int, str]:
    code = health_cli.main(list(args))
    return code, capsys.readouterr().out.strip()


def status_json(capsys) -> dict:
    assert status_cli.main(["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_healthy_deployment_passes_and_status_shows_its_rates(env, capsys):
    start_group(env, step=500, in_flight=3, tokens=4000, running=3, waiting=1, steps_per_s=12.5, tokens_per_s=37.5)
    start_supervisor(env, {s: "g0" for s in range(NUM_SHARDS)})
    code, line = health(capsys)
    assert (code, line) == (0, f"OK: group g0 live, supervisor active, {NUM_SHARDS}/{NUM_SHARDS} shards owned")

    status = status_json(capsys)
    [group] = status["groups"]
    assert (group["health"], group["state"], group["shards"], group["metrics_port"]) == ("live", "up", NUM_SHARDS, 9461)
    assert (group["steps_per_s"], group["tokens_per_s"]) == (12.5, 37.5)
    assert (group["running"], group["waiting"], group["in_flight"], group["tokens"]) == (3, 1, 3, 4000)
    assert [r["rank"] for r in group["ranks"]] == [0, 1] and all(r["heartbeat_age_s"] < 5 for r in group["ranks"])
    assert status["supervisor"] == {"active": True}
    assert status_cli.main([]) == 0  # the table renders the same data
    table = capsys.readouterr().out
    assert "STEPS/S" in table and "12.5" in table and "37.5" in table and "supervisor active" in table


def test_a_hung_group_fails_although_every_process_lives(env, capsys):
    start_supervisor(env, {s: "g0" for s in range(NUM_SHARDS)})
    start_group(env, step=777, in_flight=2, stalled_s=45.0)  # heartbeats go on; the step does not move
    code, line = health(capsys)
    assert code == 1
    assert line.startswith("FAIL: group g0 hung: step stuck at 777 for 4") and "with 2 job(s) in flight" in line
    assert "no live owner" in line  # a hung group's shards are not served
    assert health(capsys, "--hang-after-s", "120")[0] == 0  # not yet hung by a longer standard
    assert status_json(capsys)["groups"][0]["health"] == "hung"

    start_group(env, step=777, in_flight=0, stalled_s=0.0)  # idle: a frozen step is no hang
    assert health(capsys)[0] == 0


def test_dead_fenced_missing_groups_and_a_missing_supervisor_fail(env, capsys):
    start_group(env)
    start_supervisor(env, {s: "g0" for s in range(NUM_SHARDS)})
    env.delete(keys.heartbeat("g0", 1))  # rank 1's heartbeat expired
    code, line = health(capsys)
    assert code == 1 and "group g0 dead: no heartbeat from rank(s) 1 of 2" in line

    start_group(env)
    fence(env, "g0", "inc1")
    code, line = health(capsys, "--group", "g0")
    assert code == 1 and line.startswith("FAIL: group g0 fenced")

    code, line = health(capsys, "--group", "g7")
    assert code == 1 and "group g7 is not registered" in line

    start_group(env, incarnation="inc2")  # the launcher restarted it
    env.delete(keys.supervisor_lock())
    assert health(capsys, "--group", "g0") == (0, "OK: group g0 live")
    code, line = health(capsys)
    assert code == 1 and "no supervisor holds the lock" in line
    code, line = health(capsys, "--supervisor")
    assert code == 1 and line == "FAIL: no supervisor holds the lock (is `tpq supervisor` running?)"


def test_nothing_registered_or_no_redis_fails(env, capsys, monkeypatch):
    code, line = health(capsys)
    assert code == 1 and "no worker group is registered" in line
    monkeypatch.setenv("TPQ_REDIS_URL", "redis://:secret@127.0.0.1:1/0")
    code, line = health(capsys)
    assert code == 1 and line.startswith("FAIL: ") and "secret" not in line


class FakeClock:
    """A monotonic clock the test sets by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_heartbeat_thread_reports_rates_and_a_stall(redis_url):
    conn = connect(redis_url)
    spec = HeartbeatSpec(redis_url, "g0", "inc1", interval_s=0.25, ttl_s=5)
    state = {"step": 0, "tokens": 0, "in_flight": 2}
    clock = FakeClock()
    beat = HeartbeatThread(spec, 0, step=lambda: state["step"], in_flight=lambda: state["in_flight"],
                           tokens=lambda: state["tokens"], load=lambda: (2, 1), clock=clock)

    def read(at: float) -> Heartbeat:
        clock.now = at
        beat.beat()  # what the thread does every interval (it is not started: the test beats)
        return Heartbeat.model_validate_json(conn.get(keys.heartbeat("g0", 0)))

    for i in range(1, 6):
        state["step"] += 10
        state["tokens"] += 20
        hb = read(0.25 * i)
    assert (hb.steps_per_s, hb.tokens_per_s) == (40.0, 80.0)  # 40 steps and 80 tokens over the 1 s since the first
    assert (hb.running, hb.waiting, hb.tokens, hb.stalled_s) == (2, 1, 100, 0.0)
    assert read(1.5).stalled_s == 0.25  # the step stops with jobs in flight
    hb = read(1.75)
    assert hb.stalled_s == 0.5 and hb.step == 50
    state["in_flight"] = 0
    assert read(2.0).stalled_s == 0.0
    beat.stop()
    conn.close()


def test_the_hang_clock_runs_only_while_jobs_are_in_flight(redis_url):
    """A group idle on a frozen step is live however long; once it holds jobs it is hung a hang timeout later.

    The chain the supervisor, tpq health and tpq status share: rank 0's heartbeat thread, then judge_group.
    """
    conn = connect(redis_url)
    info = GroupInfo(group="g0", incarnation="inc1", tp=1, model="m", host="h", pid=1, worker_name="w", started_at=0)
    state = {"in_flight": 0}
    clock = FakeClock()
    beat = HeartbeatThread(HeartbeatSpec(redis_url, "g0", "inc1", interval_s=0.5, ttl_s=5), 0, step=lambda: 5,
                           in_flight=lambda: state["in_flight"], clock=clock)

    def judge(at: float) -> GroupHealth:
        clock.now = at
        beat.beat()
        hb = Heartbeat.model_validate_json(conn.get(keys.heartbeat("g0", 0)))
        return judge_group(info, None, [hb], now=hb.ts, heartbeat_ttl_s=5, hang_after_s=1.0).health

    assert judge(0.0) is GroupHealth.LIVE
    assert judge(50.0) is GroupHealth.LIVE
    state["in_flight"] = 2
    assert judge(50.5) is GroupHealth.LIVE, "the hang clock starts when jobs are in flight"
    assert judge(51.5) is GroupHealth.HUNG
    beat.stop()
    conn.close()
