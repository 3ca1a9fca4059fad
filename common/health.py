"""Is a worker group healthy? The one judgement, from its registration, its fence and its ranks' heartbeats.

:func:`judge_group` is the only place tpqueue classifies a group: the
supervisor fences on its verdict, and ``tpq health``, ``tpq status`` and the
``tpq_group_up`` metric report it, so they always agree. It is a decision
as data: no I/O, the clock (``now``, Unix time) is an argument, the caller
carries the verdict out. A group is

- ``fenced`` when the supervisor fenced its registered incarnation (it
  declared it dead or hung; its launcher is restarting it);
- ``starting`` when a rank has not heartbeated yet, within ``heartbeat_ttl_s``
  of the incarnation's start;
- ``dead`` when a rank's heartbeat is missing after that (a crashed or
  SIGSTOPped process writes none, and the key expires after its TTL);
- ``hung`` when rank 0 holds jobs and its step has not advanced for
  ``hang_after_s``. Rank 0's heartbeat thread measures this itself and
  reports it as ``stalled_s`` (``common.heartbeat``): the thread keeps
  beating while the decode loop is stuck, which is what makes a hang
  visible rather than only a dead process, and the measure lives with the
  group, so no reader keeps a timer and a restarted reader loses nothing;
- ``live`` otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from common.groups import GroupInfo, GroupRecord, Heartbeat


class GroupHealth(str, Enum):
    """The state of a group's registered incarnation (see the module docstring)."""

    LIVE = "live"
    STARTING = "starting"
    DEAD = "dead"
    HUNG = "hung"
    FENCED = "fenced"

    @property
    def ok(self) -> bool:
        """Whether this state passes ``tpq health`` (a starting group is not a failure)."""
        return self in (GroupHealth.LIVE, GroupHealth.STARTING)

    @property
    def processes_up(self) -> bool:
        """Whether every rank heartbeats its incarnation and it is not fenced (live, or hung with its processes up)."""
        return self in (GroupHealth.LIVE, GroupHealth.HUNG)

    @property
    def to_fence(self) -> bool:
        """Whether the supervisor fences an incarnation in this state (dead or hung)."""
        return self in (GroupHealth.DEAD, GroupHealth.HUNG)


@dataclass(frozen=True)
class GroupVerdict:
    """The health of one incarnation and, when it is not live, why."""

    health: GroupHealth
    reason: str = ""


def stalled_for(rank0: Heartbeat, now: float, max_age_s: float) -> float:
    """Seconds rank 0's step has not advanced while it held jobs, as of ``now`` (0 if it advances or idles).

    The heartbeat's ``stalled_s`` plus its age, the age taken as at most
    ``max_age_s`` (the heartbeat TTL: a heartbeat older than that has
    expired), so a reader whose clock runs ahead of rank 0's host cannot
    add more than one TTL.
    """
    if rank0.stalled_s <= 0 or rank0.in_flight == 0:
        return 0.0
    return rank0.stalled_s + min(max_age_s, max(0.0, now - rank0.ts))


def judge_group(info: GroupInfo, fenced: str | None, beats: list[Heartbeat], *, now: float,
                heartbeat_ttl_s: float, hang_after_s: float) -> GroupVerdict:
    """The health of ``info``'s incarnation as of ``now`` (Unix time).

    ``fenced``: the incarnation in the group's fence field, if any;
    ``beats``: the group's present heartbeats (those of another incarnation
    count as missing).
    """
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
        return GroupVerdict(GroupHealth.DEAD, f"no heartbeat from rank(s) {ranks} of {info.tp} "
                                              f"(heartbeat TTL {heartbeat_ttl_s:g} s)")
    rank0 = mine[0]
    stalled = stalled_for(rank0, now, heartbeat_ttl_s)
    if stalled >= hang_after_s:
        return GroupVerdict(GroupHealth.HUNG, f"step stuck at {rank0.step} for {stalled:.1f} s with "
                                              f"{rank0.in_flight} job(s) in flight (hang timeout {hang_after_s:g} s)")
    return GroupVerdict(GroupHealth.LIVE)


def judge_groups(records: dict[str, GroupRecord], *, now: float, heartbeat_ttl_s: float,
                 hang_after_s: float) -> dict[str, GroupVerdict]:
    """:func:`judge_group` of every group in ``records`` (as :func:`common.groups.read_group_records` reads them)."""
    return {name: judge_group(r.info, r.fenced, r.beats, now=now, heartbeat_ttl_s=heartbeat_ttl_s,
                              hang_after_s=hang_after_s) for name, r in records.items()}
