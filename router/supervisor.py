"""The recovery supervisor: watches worker groups, fences dead or hung ones, keeps the shard map, requeues.

One pass (:meth:`Supervisor.run_once`, every ``interval_s``):

1. Hold the single-supervisor lock ``keys.supervisor_lock()`` (SET NX PX
   with a random owner id, renewed each pass). Without it the supervisor is
   a standby and does nothing else. While Redis has been answering for less
   than ``heartbeat_ttl_s`` since it restarted, the pass ends here too:
   the heartbeats and rq job heartbeats written before a restart expired
   while Redis was down (their TTLs run on the wall clock), and the live
   ranks have not had time to write new ones.
2. Read every registered group, its fence and its ranks' heartbeats, and
   judge each incarnation with :func:`common.health.judge_group`, the one
   verdict ``tpq health``, ``tpq status`` and the metrics also report:
   DEAD when a rank's heartbeat is missing (after a start-up grace of
   ``heartbeat_ttl_s`` from ``started_at``): a crashed or SIGSTOPped rank
   writes none; HUNG when rank 0 holds jobs and its step has not moved for
   ``hang_timeout_s``, as rank 0's heartbeat thread measures and reports
   (``stalled_s``; it beats on while the decode loop is stuck).
3. Fence every DEAD or HUNG incarnation, write the shard map for the LIVE
   groups (epoch-guarded; also whenever the live set changed), then requeue
   the fenced incarnations' started rq jobs at once (Retry applies).
4. rq's ``StartedJobRegistry.cleanup`` on every tpqueue queue with expired
   entries; every ``maintenance_interval_s`` rq's registry and
   intermediate-queue cleanups, and a sweep of every still-registered fenced
   incarnation's jobs (what a supervisor that died mid-recovery left).

All state lives in Redis, hang detection included (the stall is measured
by the group and carried in its heartbeat; the supervisor keeps no timer),
so a restarted supervisor, or a standby taking over, picks up where the last
one stopped: a hang that began before it started is declared as soon as it
reaches ``hang_timeout_s``, not ``hang_timeout_s`` after the restart.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from common import keys
from common.claims import return_claimed
from common.groups import FENCED_FIELD, GroupInfo, Heartbeat, fence, read_groups, read_shard_map
from common.health import GroupHealth, GroupVerdict, judge_group
from common.logs import job_event
from common.metrics import GroupMetrics
from common.settings import Settings
from common.text import as_optional_text
from router import rq_maintenance
from router.shard_map import assign_shards, moved_shards, write_shard_map

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.5
DEFAULT_MAINTENANCE_INTERVAL_S = 60.0
MIN_LOCK_TTL_S = 2.0
REDIS_ERROR_BACKOFF_CAP_S = 5.0

# KEYS[1]: the lock. ARGV[1]: owner id, ARGV[2]: TTL in ms. Renew only if we still own it.
_RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1]: the lock. ARGV[1]: owner id. Delete only if we still own it.
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass
class PassResult:
    """What one :meth:`Supervisor.run_once` did."""

    leader: bool
    live: list[str] = field(default_factory=list)
    declared: dict[str, str] = field(default_factory=dict)  # group -> reason it was fenced this pass
    epoch: int | None = None  # the shard-map epoch this pass wrote, if it wrote one
    moved: list[int] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    expired: int = 0  # expired started entries handed to rq's cleanup
    settling: str = ""  # why groups were not judged this pass (Redis restarted moments ago)


class Supervisor:
    """Watches worker groups through Redis and recovers from dead or hung ones (see the module docstring).

    ``conn`` is a ``redis.Redis`` from :func:`common.redis_conn.connect`
    (bytes responses). Counters for metrics, never reset:
    ``groups_declared_dead`` (dead or hung incarnations fenced; of which
    ``groups_declared_hung``), ``shard_reassignments`` (shards whose owner
    changed in a map this supervisor wrote), ``shard_map_writes``,
    ``jobs_requeued`` and ``jobs_failed`` (started jobs of fenced
    incarnations requeued, or failed for lack of retries), ``expired_jobs_cleaned``
    (expired started entries handed to rq's cleanup). ``clock`` (Unix
    time) is the verdicts' clock; ``monotonic`` times the grace after a
    Redis restart and the maintenance interval.
    """

    def __init__(
        self,
        conn: redis.Redis,
        settings: Settings,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        lock_ttl_s: float | None = None,
        maintenance_interval_s: float = DEFAULT_MAINTENANCE_INTERVAL_S,
        owner_id: str | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.conn = conn
        self.settings = settings
        self.interval_s = interval_s
        self.lock_ttl_s = lock_ttl_s if lock_ttl_s is not None else max(MIN_LOCK_TTL_S, 5 * interval_s)
        if self.lock_ttl_s <= interval_s:
            raise ValueError(f"lock_ttl_s ({self.lock_ttl_s}) must exceed interval_s ({interval_s})")
        self.maintenance_interval_s = maintenance_interval_s
        self.owner_id = owner_id or f"supervisor-{secrets.token_hex(8)}"
        self.queue_names = keys.shard_queue_names(settings.num_shards) + [keys.BATCH_QUEUE]
        self._clock, self._monotonic = clock, monotonic
        self._renew = conn.register_script(_RENEW_SCRIPT)
        self._release = conn.register_script(_RELEASE_SCRIPT)
        self._leader = False
        self._last_maintenance = float("-inf")
        self._redis_run_id: str | None = None
        self._redis_since = float("-inf")  # monotonic time a Redis restart was first seen answering
        self.groups_declared_dead = 0
        self.groups_declared_hung = 0
        self.shard_reassignments = 0
        self.shard_map_writes = 0
        self.jobs_requeued = 0
        self.jobs_failed = 0
        self.expired_jobs_cleaned = 0

    @property
    def is_leader(self) -> bool:
        """Whether this supervisor held the lock at its last pass."""
        return self._leader

    # -------------------------------------------------------------- the loop

    def run(self, stop_event: threading.Event) -> None:
        """Run passes every ``interval_s`` until ``stop_event`` is set; release the lock on the way out.

        A Redis error ends the pass, not the loop: the next pass comes after
        a back-off doubling from ``interval_s`` up to 5 s.
        """
        backoff = self.interval_s
        try:
            while not stop_event.is_set():
                try:
                    self.run_once()
                    backoff = self.interval_s
                except redis.RedisError as exc:
                    log.warning("supervisor %s: Redis error, retrying in %.1f s: %s", self.owner_id, backoff, exc)
                    self._leader = False
                    stop_event.wait(backoff)
                    backoff = min(REDIS_ERROR_BACKOFF_CAP_S, backoff * 2)
                    continue
                stop_event.wait(self.interval_s)
        finally:
            self.release()

    def run_once(self) -> PassResult:
        """One pass (see the module docstring). Standby (``leader=False``, nothing done) without the lock."""
        if not self._hold_lock():
            return PassResult(leader=False)
        settling = self._redis_settling()
        if settling:
            return PassResult(leader=True, settling=settling)
        infos = read_groups(self.conn)
        fenced, beats = self._read_fences_and_beats(infos)
        verdicts = self._judge(infos, fenced, beats)
        result = PassResult(leader=True, live=sorted(g for g, v in verdicts.items() if v.health is GroupHealth.LIVE))
        declared = {g: v for g, v in verdicts.items() if v.health.to_fence}
        self._fence(infos, declared, result)
        self._update_shard_map(result)
        for group in declared:
            self._requeue(infos[group], result.declared[group], result)
        self._maintain(infos, fenced, result)
        return result

    def release(self) -> None:
        """Give up the lock if this supervisor holds it, so a standby takes over at its next pass."""
        try:
            self._release(keys=[keys.supervisor_lock()], args=[self.owner_id])
        except redis.RedisError as exc:
            log.warning("supervisor %s: could not release the lock (it expires by itself): %s", self.owner_id, exc)
        if self._leader:
            log.info("supervisor %s: released the supervisor lock", self.owner_id)
        self._leader = False

    # -------------------------------------------------------------- the lock

    def _hold_lock(self) -> bool:
        ttl_ms = int(self.lock_ttl_s * 1000)
        if self._leader and self._renew(keys=[keys.supervisor_lock()], args=[self.owner_id, ttl_ms]):
            return True
        if self._leader:
            log.warning("supervisor %s: lost the supervisor lock; standing by", self.owner_id)
            self._leader = False
        if not self.conn.set(keys.supervisor_lock(), self.owner_id, nx=True, px=ttl_ms):
            return False
        self._become_leader()
        return True

    def _become_leader(self) -> None:
        log.info("supervisor %s: acquired the supervisor lock; now active", self.owner_id)
        self._leader = True
        self._last_maintenance = float("-inf")  # sweep what a previous supervisor may have left at once

    def _redis_settling(self) -> str:
        """Why groups cannot be judged yet ('' when they can): Redis restarted less than a heartbeat TTL ago.

        A rank writes its heartbeat (and rank 0 its jobs' rq heartbeats) at
        most ``heartbeat_interval_s`` after Redis answers again; the keys it
        wrote before a restart expired on the wall clock while Redis was
        down or loading. A restart shows as a new ``run_id``, timed from the
        first pass that sees it: the lock was just taken, so Redis accepts
        writes again, and a long AOF load does not eat the grace. The
        ``run_id`` this supervisor sees first is taken as settled (it may
        have been started beside a fresh Redis, whose groups start afresh
        too). A Redis without ``INFO server`` (fakeredis) never waits.
        """
        try:
            run_id = self.conn.info("server").get("run_id")
        except redis.ResponseError:
            return ""
        now = self._monotonic()
        if run_id != self._redis_run_id:
            if self._redis_run_id is not None:
                self._redis_since = now
                log.info("supervisor %s: Redis restarted (run id %s); judging groups again in %.1f s",
                         self.owner_id, run_id, self.settings.heartbeat_ttl_s)
            self._redis_run_id = run_id
        up_s = now - self._redis_since
        if up_s >= self.settings.heartbeat_ttl_s:
            return ""
        return (f"Redis answers again since {up_s:.1f} s; waiting {self.settings.heartbeat_ttl_s:g} s "
                "(the heartbeat TTL) for the ranks' heartbeats before judging groups")

    # -------------------------------------------------------------- reading and judging

    def _read_fences_and_beats(
        self, infos: dict[str, GroupInfo]
    ) -> tuple[dict[str, str | None], dict[str, list[Heartbeat]]]:
        """Each group's fence value and its ranks' present heartbeats, in one round trip."""
        with self.conn.pipeline(transaction=False) as pipe:
            for name, info in infos.items():
                pipe.hget(keys.group_info(name), FENCED_FIELD)
                pipe.mget([keys.heartbeat(name, rank) for rank in range(info.tp)])
            replies = pipe.execute()
        fenced, beats = {}, {}
        for i, name in enumerate(infos):
            raw_fence, raw_beats = replies[2 * i], replies[2 * i + 1]
            fenced[name] = as_optional_text(raw_fence)
            beats[name] = [beat for beat in map(_parse_beat, raw_beats) if beat is not None]
        return fenced, beats

    def _judge(
        self, infos: dict[str, GroupInfo], fenced: dict[str, str | None], beats: dict[str, list[Heartbeat]]
    ) -> dict[str, GroupVerdict]:
        now = self._clock()
        return {
            name: judge_group(info, fenced[name], beats[name], now=now, heartbeat_ttl_s=self.settings.heartbeat_ttl_s,
                              hang_after_s=self.settings.hang_timeout_s)
            for name, info in infos.items()
        }

    # -------------------------------------------------------------- acting

    def _fence(self, infos: dict[str, GroupInfo], declared: dict[str, GroupVerdict], result: PassResult) -> None:
        if not declared:
            return
        with self.conn.pipeline(transaction=False) as pipe:
            for group in declared:
                fence(pipe, group, infos[group].incarnation)
            pipe.execute()
        for group, verdict in declared.items():
            info = infos[group]
            self.groups_declared_dead += 1
            self.groups_declared_hung += verdict.health is GroupHealth.HUNG
            result.declared[group] = _declared_reason(verdict)
            log.info("group %s (incarnation %s, rq worker %s) declared %s and fenced: %s",
                     group, info.incarnation, info.worker_name, verdict.health.value, result.declared[group])

    def _update_shard_map(self, result: PassResult) -> None:
        epoch, current = read_shard_map(self.conn)
        wanted = assign_shards(self.settings.num_shards, result.live, current)
        if wanted == current:
            return
        written = write_shard_map(self.conn, wanted, epoch)
        if written is None:
            log.warning("shard map changed under us at epoch %d; recomputing next pass", epoch)
            return
        moved = moved_shards(current, wanted)
        self.shard_map_writes += 1
        self.shard_reassignments += len(moved)
        result.epoch, result.moved = written, moved
        log.info("shard map epoch %d: %d shard(s) moved over live groups [%s]; %s",
                 written, len(moved), ", ".join(result.live), _describe_moves(current, wanted, moved))

    def _requeue(self, info: GroupInfo, reason: str, result: PassResult) -> None:
        why = (f"worker group {info.group} (incarnation {info.incarnation}) was declared dead by the "
               f"supervisor: {reason}")
        report = rq_maintenance.requeue_worker_jobs(self.conn, self.queue_names, info.worker_name, why)
        returned = return_claimed(self.conn, info.group, fenced_incarnation=info.incarnation)
        if returned:
            log.info("group %s (incarnation %s): %d claimed but unstarted job(s) put back on their queues",
                     info.group, info.incarnation, returned)
        self.jobs_requeued += len(report.requeued)
        self.jobs_failed += len(report.failed)
        GroupMetrics(info.group).jobs_retried("supervisor", len(report.requeued))
        GroupMetrics(info.group).job_failed(len(report.failed))
        for job_id in report.requeued:
            job_event(log, "requeued", job_id, queue=report.queues.get(job_id), group=info.group, rank=None,
                      reason="supervisor")
        for job_id in report.failed:
            error = ("its group died and its data cannot be read" if job_id in report.unreadable
                     else "its group died and it has no retries left")
            job_event(log, "failed", job_id, queue=report.queues.get(job_id), group=info.group, rank=None,
                      level=logging.WARNING, error=error)
        result.requeued += report.requeued
        result.failed += report.failed
        if report.requeued or report.failed:
            log.info("group %s (incarnation %s): %d started job(s) requeued, %d failed",
                     info.group, info.incarnation, len(report.requeued), len(report.failed))

    def _maintain(self, infos: dict[str, GroupInfo], fenced: dict[str, str | None], result: PassResult) -> None:
        result.expired = rq_maintenance.cleanup_expired(self.conn, self.queue_names)
        if result.expired:
            self.expired_jobs_cleaned += result.expired
            log.info("%d started job(s) past their rq heartbeat TTL handed to rq's cleanup (requeued or failed)",
                     result.expired)
        if self._monotonic() - self._last_maintenance < self.maintenance_interval_s:
            return
        self._last_maintenance = self._monotonic()
        for group, info in infos.items():
            if fenced.get(group) == info.incarnation and group not in result.declared:
                self._requeue(info, "fenced earlier; its started jobs were still registered", result)
        stuck = rq_maintenance.clean_queues(self.conn, self.queue_names)
        if stuck:
            log.info("%d job(s) stuck in rq intermediate queues requeued or failed", stuck)


def _declared_reason(verdict: GroupVerdict) -> str:
    """Why an incarnation was fenced, as :class:`PassResult` and the requeued jobs' failure text say it."""
    return f"hung: {verdict.reason}" if verdict.health is GroupHealth.HUNG else verdict.reason


def _parse_beat(raw: bytes | None) -> Heartbeat | None:
    if raw is None:
        return None
    try:
        return Heartbeat.model_validate_json(raw)
    except ValueError:
        return None


def _describe_moves(old: dict[int, str], new: dict[int, str], moved: list[int]) -> str:
    """``"3: g1 -> g2, 5: - -> g1"`` for the first moved shards (a count beyond that)."""
    shown = [f"{s}: {old.get(s, '-')} -> {new.get(s, '-')}" for s in moved[:16]]
    more = f" and {len(moved) - 16} more" if len(moved) > 16 else ""
    return ", ".join(shown) + more if shown else "no moves"
