"""Is a worker group healthy? One judgement from its registration, its fence and its ranks' heartbeats.

Used by ``tpq health``, ``tpq status`` and the supervisor's ``tpq_group_up``
metric, so they always agree. A group is

- ``fenced`` when the supervisor fenced its registered incarnation (it
  declared it dead or hung; its launcher is restarting it);
- ``starting`` when a rank has not heartbeated yet, within ``heartbeat_ttl_s``
  of the incarnation's start;
- ``dead`` when a rank's heartbeat is missing after that;
- ``hung`` when rank 0 holds jobs and its step has not advanced for
  ``hang_after_s`` (rank 0's heartbeat thread reports ``stalled_s``; it
  keeps beating while the decode loop is stuck, which is what makes a hang
  visible rather than only a dead process);
- ``live`` otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from common.groups import GroupInfo, Heartbeat


class GroupHealth(str, Enum):
    LIVE = "live"
    STARTING = "starting"
    DEAD = "dead"
    HUNG = "hung"
    FENCED = "fenced"

    @property
    def ok(self) -> bool:
        """Whether this state passes ``tpq health`` (a starting group is not a failure)."""
        return self in (GroupHealth.LIVE, GroupHealth.STARTING)


@dataclass(frozen=True)
class GroupVerdict:
    health: GroupHealth
    reason: str = ""


def stalled_for(rank0: Heartbeat, now: float) -> float:
    """Seconds rank 0's step has not advanced while it held jobs, as of ``now`` (0 if it advances or idles)."""
    if rank0.stalled_s <= 0 or rank0.in_flight == 0:
        return 0.0
    return rank0.stalled_s + max(0.0, now - rank0.ts)


def judge_group(info: GroupInfo, fenced: str | None, beats: list[Heartbeat], *, now: float,
                heartbeat_ttl_s: float, hang_after_s: float) -> GroupVerdict:
    """The health of ``info``'s incarnation. ``fenced``: the incarnation in the group's fence field, if any;
    ``beats``: the group's live heartbeats (those of another incarnation are ignored)."""
    if fenced == info.incarnation:
        return GroupVerdict(GroupHealth.FENCED, "fenced by the supervisor (declared dead or hung); its launcher "
                                                "restarts it")
    mine = {b.rank: b for b in beats if b.incarnation == info.incarnation}
    missing = [rank for rank in range(info.tp) if rank not in mine]
    if missing:
        ranks = ", ".join(map(str, missing))
        age = now - info.started_at
        if age < heartbeat_ttl_s:
            return GroupVerdict(GroupHealth.STARTING, f"started {age:.1f} s ago; waiting for rank(s) {ranks}")
        return GroupVerdict(GroupHealth.DEAD, f"no heartbeat from rank(s) {ranks} of {info.tp}")
    rank0 = mine[0]
    stalled = stalled_for(rank0, now)
    if stalled >= hang_after_s:
        return GroupVerdict(GroupHealth.HUNG, f"step stuck at {rank0.step} for {stalled:.0f} s with "
                                              f"{rank0.in_flight} job(s) in flight")
    return GroupVerdict(GroupHealth.LIVE)
