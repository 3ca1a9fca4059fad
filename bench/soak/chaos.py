"""The soak's chaos: the faults it injects into the stack, and the wait for the stack to be whole again.

One fault every ``interval_s`` (+-50%) after the stack recovered from the
previous one: kill -9 of a random non-zero rank, of rank 0, of the
supervisor, a Redis restart (SIGTERM), a Redis SIGKILL that also cuts the
AOF back by what a machine crash would lose and, with ``--http``, kill -9 of
a gateway replica (its clients move to the other one).
"""
from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.soak.gateways import Gateways
from bench.soak.http_clients import HttpJobs
from bench.soak.workload import REDIS_ERRORS
from common import keys
from common.groups import FENCED_FIELD, read_group, read_groups, read_heartbeats, read_shard_map
from common.redis_conn import connect
from common.text import as_optional_text
from producer.local_stack.embedded_redis import RedisServer
from producer.local_stack.stack import LocalStack
from router.rq_maintenance import started_entries

FAULTS = ("rank", "rank0", "supervisor", "redis", "redis-kill", "gateway-kill")
DEFAULT_FAULTS = FAULTS[:4]  # redis-kill with --redis-sigkill, gateway-kill with --http


@dataclass
class Fault:
    """One injected fault and how the stack came back from it."""

    kind: str
    target: str
    at_wall: float
    at_mono: float
    interrupted: set[str]  # jobs in flight where the fault hit
    lost_s: float = 0.0  # a SIGKILL whose AOF was cut back: the seconds of writes it lost
    ready_s: float | None = None  # None: not whole again within the recovery timeout (wedged)
    next_token_s: float | None = None


class AofTail(threading.Thread):
    """Samples the size of Redis' AOF file, so that a SIGKILL can also drop what a machine crash would lose.

    A killed redis-server loses nothing it has written to the file (the
    page cache survives the process); a crashed machine loses what was not
    fsynced, up to about ``lost_s`` with ``appendfsync everysec``.
    :meth:`truncate` cuts the file back to its size ``lost_s`` ago (Redis
    loads a truncated AOF, ``aof-load-truncated yes``).
    """

    def __init__(self, path: Path, lost_s: float) -> None:
        super().__init__(name="soak-aof", daemon=True)
        self.path, self.lost_s = path, lost_s
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=200)  # time, inode, size
        self._lock = threading.Lock()

    def run(self) -> None:
        while True:
            try:
                stat = self.path.stat()
            except OSError:
                pass
            else:
                with self._lock:
                    self._samples.append((time.monotonic(), stat.st_ino, stat.st_size))
            time.sleep(0.05)

    def truncate(self) -> int:
        """Cut the (stopped) server's AOF to its size ``lost_s`` ago; the bytes dropped."""
        stat = self.path.stat()
        then = time.monotonic() - self.lost_s
        with self._lock:
            old = [(inode, size) for t, inode, size in self._samples if t <= then]
            self._samples.clear()
        if not old or old[-1][0] != stat.st_ino or old[-1][1] >= stat.st_size:
            return 0  # rewritten meanwhile, or nothing new: keep it whole
        os.truncate(self.path, old[-1][1])
        return stat.st_size - old[-1][1]


class Chaos(threading.Thread):
    """Injects one fault every ``interval_s`` (+-50%) after the stack has recovered from the previous one."""

    def __init__(self, stack: LocalStack, server: RedisServer, kinds: list[str], interval_s: float,
                 recovery_timeout_s: float, rng: random.Random, aof_lost_s: float,
                 gateways: Gateways | None = None, http: HttpJobs | None = None) -> None:
        super().__init__(name="soak-chaos", daemon=True)
        self.stack, self.server, self.kinds = stack, server, kinds
        self.gateways, self.http = gateways, http
        self.aof = AofTail(server.dir / "appendonly.aof", aof_lost_s) if aof_lost_s > 0 else None
        if self.aof is not None:
            self.aof.start()
        self.interval_s, self.recovery_timeout_s, self.rng = interval_s, recovery_timeout_s, rng
        self.conn = connect(server.url, client_name="tpq-soak-chaos")
        self.queue_names = keys.shard_queue_names(stack.settings.num_shards) + [keys.BATCH_QUEUE]
        self.faults: list[Fault] = []
        self.skipped: collections.Counter[str] = collections.Counter()
        self.stop_event = threading.Event()

    def stop(self) -> None:
        self.stop_event.set()
        self.join()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s * self.rng.uniform(0.5, 1.5)):
            kind = self.rng.choice(self.kinds)
            try:
                fault = self._inject(kind)
            except REDIS_ERRORS as exc:
                self.skipped[f"{kind} (Redis error: {type(exc).__name__})"] += 1
                continue
            if fault is None:
                continue
            self.faults.append(fault)
            fault.ready_s = self._wait_recovered(fault)
            print(f"  fault {len(self.faults)}: {fault.kind} {fault.target}: whole again after "
                  f"{_seconds(fault.ready_s)}", flush=True)

    # -- injecting

    def _inject(self, kind: str) -> Fault | None:
        if kind in ("rank", "rank0"):
            return self._kill_rank(kind)
        if kind == "gateway-kill":
            return self._kill_gateway()
        interrupted = {e.job_id for e in started_entries(self.conn, self.queue_names)}
        now_wall, now_mono = time.time(), time.monotonic()
        if kind == "supervisor":
            owner = self.conn.get(keys.supervisor_lock())
            self.stack.supervisor.kill()
            target = f"pid {self.stack.supervisor.pid} (lock {as_optional_text(owner)})"
            return Fault(kind, target, now_wall, now_mono, interrupted)
        dropped = 0
        if kind == "redis":
            self.server.stop()
        else:
            self.server.kill()
            dropped = self.aof.truncate() if self.aof is not None else 0
        self.conn.connection_pool.disconnect()
        self.server.start()
        what = f"port {self.server.port}" + (f", {dropped:,} AOF bytes dropped" if dropped else "")
        return Fault(kind, what, now_wall, now_mono, interrupted, lost_s=self.aof.lost_s if dropped else 0.0)

    def _kill_rank(self, kind: str) -> Fault | None:
        live = self._live_groups()
        if not live:
            self.skipped[f"{kind} (no live group)"] += 1
            return None
        group = self.rng.choice(sorted(live))
        info, beats = live[group]
        rank = 0 if kind == "rank0" else self.rng.randrange(1, info.tp)
        if rank == 0 and beats[0].pid != info.pid:
            self.skipped[f"{kind} (rank 0 pid changed)"] += 1
            return None
        interrupted = {e.job_id for e in started_entries(self.conn, self.queue_names)
                       if e.worker_name == info.worker_name}
        pid = beats[rank].pid
        now_wall, now_mono = time.time(), time.monotonic()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            self.skipped[f"{kind} (process already gone)"] += 1
            return None
        return Fault(kind, f"{group} rank {rank} pid {pid} (incarnation {info.incarnation})", now_wall, now_mono,
                     interrupted)

    def _kill_gateway(self) -> Fault | None:
        replica = self.rng.randrange(len(self.gateways.ports))
        interrupted = self.http.on_replica(replica)
        now_wall, now_mono = time.time(), time.monotonic()
        pid = self.gateways.kill(replica)
        if pid is None:
            self.skipped[f"gateway-kill (replica {replica} not running)"] += 1
            return None
        return Fault("gateway-kill", f"replica {replica} pid {pid}", now_wall, now_mono, interrupted)

    def _live_groups(self) -> dict:
        """Groups whose every rank heartbeats with the registered incarnation, not fenced: ``{name: (info, beats)}``."""
        live = {}
        beats = read_heartbeats(self.conn)
        for name, info in read_groups(self.conn).items():
            mine = {b.rank: b for b in beats if b.group == name and b.incarnation == info.incarnation}
            # a fence of an earlier incarnation may outlive its successor's registration (the supervisor fenced it
            # after the new one registered): only a fence of this incarnation stops it
            fenced = as_optional_text(self.conn.hget(keys.group_info(name), FENCED_FIELD))
            if len(mine) == info.tp and fenced != info.incarnation:
                live[name] = (info, [mine[r] for r in range(info.tp)])
        return live

    # -- waiting for the stack to be whole again

    def _wait_recovered(self, fault: Fault) -> float | None:
        deadline = fault.at_mono + self.recovery_timeout_s  # measured even when stop() came meanwhile
        while time.monotonic() < deadline:
            try:
                if self._recovered(fault):
                    return time.monotonic() - fault.at_mono
            except REDIS_ERRORS:
                pass
            time.sleep(0.05)
        return None

    def _recovered(self, fault: Fault) -> bool:
        if fault.kind == "gateway-kill":  # a new process on the replica's port, answering /health with 200
            _, replica, _, pid = fault.target.split()
            new = self.gateways.pid(int(replica))
            return new is not None and new != int(pid) and self.gateways.healthy(int(replica))
        if fault.kind == "supervisor":
            owner = as_optional_text(self.conn.get(keys.supervisor_lock()))
            return owner is not None and owner not in fault.target
        if fault.kind in ("rank", "rank0"):
            group = fault.target.split()[0]
            info = read_group(self.conn, group)
            if info is None or info.incarnation in fault.target:
                return False
        return self._whole()

    def _whole(self) -> bool:
        live = self._live_groups()
        if set(live) != set(self.stack.group_names):
            return False
        epoch, shard_map = read_shard_map(self.conn)
        return (epoch > 0 and len(shard_map) == self.stack.settings.num_shards
                and set(shard_map.values()) == set(live))



def _seconds(value: float | None) -> str:
    return "never (wedged)" if value is None else f"{value:.1f} s"

