"""common.health.judge_group: the one verdict on a group, as pure data from its registration, fence and heartbeats."""
from __future__ import annotations

from common.groups import GroupInfo, make_heartbeat
from common.health import GroupHealth, judge_group

TTL_S, HANG_S = 2.0, 10.0
INFO = GroupInfo(group="g", incarnation="inc", tp=2, model="m", host="h", pid=1, worker_name="w", started_at=1000.0)


def beats(stalled_s: float = 0.0, in_flight: int = 1, incarnation: str = "inc", ranks: range = range(2)) -> list:
    return [make_heartbeat("g", rank, incarnation, step=7, in_flight=in_flight if rank == 0 else 0,
                           stalled_s=stalled_s if rank == 0 else 0.0) for rank in ranks]


def judge(group_beats: list, now: float, fenced: str | None = None):
    return judge_group(INFO, fenced, group_beats, now=now, heartbeat_ttl_s=TTL_S, hang_after_s=HANG_S)


def test_a_group_whose_ranks_all_beat_is_live_and_its_fenced_incarnation_is_fenced():
    live = beats()
    assert judge(live, live[0].ts).health is GroupHealth.LIVE
    assert judge(live, live[0].ts, fenced="inc").health is GroupHealth.FENCED
    assert judge(live, live[0].ts, fenced="older").health is GroupHealth.LIVE, "an older incarnation's fence"


def test_a_missing_rank_is_starting_within_a_ttl_of_the_start_then_dead():
    one = beats(ranks=range(1))
    starting = judge(one, INFO.started_at + TTL_S - 0.1)
    assert starting.health is GroupHealth.STARTING and "waiting for rank(s) 1" in starting.reason
    dead = judge(one, INFO.started_at + TTL_S)
    assert dead.health is GroupHealth.DEAD
    assert dead.reason == f"no heartbeat from rank(s) 1 of 2 (heartbeat TTL {TTL_S:g} s)"
    assert judge(beats(incarnation="older"), 2000.0).health is GroupHealth.DEAD, "another incarnation's beats"


def test_a_stall_reported_by_rank_0_makes_the_group_hung_once_it_reaches_the_hang_timeout():
    almost, stuck = beats(stalled_s=HANG_S - 0.5), beats(stalled_s=HANG_S)
    assert judge(almost, almost[0].ts).health is GroupHealth.LIVE
    hung = judge(stuck, stuck[0].ts)
    assert hung.health is GroupHealth.HUNG
    assert hung.reason == f"step stuck at 7 for {HANG_S:.1f} s with 1 job(s) in flight (hang timeout {HANG_S:g} s)"
    assert judge(beats(stalled_s=3 * HANG_S, in_flight=0), 2000.0).health is GroupHealth.LIVE, "idle is no hang"


def test_the_stall_grows_with_the_heartbeats_age_by_at_most_one_ttl():
    almost = beats(stalled_s=HANG_S - 0.5)
    assert judge(almost, almost[0].ts + 0.4).health is GroupHealth.LIVE
    assert judge(almost, almost[0].ts + 0.5).health is GroupHealth.HUNG, "between beats the stall goes on"
    early = beats(stalled_s=HANG_S - TTL_S - 0.5)
    assert judge(early, early[0].ts + 1000).health is GroupHealth.LIVE, "a clock running ahead adds one TTL at most"


def test_which_states_pass_tpq_health_are_fenced_or_have_their_processes_up():
    assert {h for h in GroupHealth if h.ok} == {GroupHealth.LIVE, GroupHealth.STARTING}
    assert {h for h in GroupHealth if h.to_fence} == {GroupHealth.DEAD, GroupHealth.HUNG}
    assert {h for h in GroupHealth if h.processes_up} == {GroupHealth.LIVE, GroupHealth.HUNG}
