"""The soak's gateway replicas: ``tpq gateway`` processes on free ports over the stack's Redis, kept running.

Each replica is its own process, as in production behind a load balancer.
A keeper thread starts a replica again whenever it exits (a ``gateway-kill``
fault, or a start refused while Redis was down), as the stack does for its
supervisor; :meth:`Gateways.kill` is the fault.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from common.parent_death import signal_on_parent_death
from producer.local_stack.embedded_redis import free_port

log = logging.getLogger(__name__)

RESTART_PAUSE_S = 0.5
GATEWAY_ENV = {
    # a client whose replica died resumes on the other; its jobs must outlive the gap (the soak never drops a stream
    # on purpose, so nothing waits out this grace)
    "TPQ_HTTP_DISCONNECT_GRACE_S": "60",
}


class Gateways:
    """``replicas`` gateway processes on ``redis_url``; :meth:`start`, :meth:`kill`, :meth:`stop`."""

    def __init__(self, redis_url: str, replicas: int = 2, log_level: str | None = None) -> None:
        self.redis_url, self.log_level = redis_url, log_level
        self.ports = [free_port() for _ in range(replicas)]
        self.processes: list[subprocess.Popen | None] = [None] * replicas
        self.starts = [0] * replicas  # processes started per replica (the first included)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._keeper = threading.Thread(target=self._keep, name="soak-gateways", daemon=True)

    def url(self, replica: int) -> str:
        """The replica's base URL, without ``/v1``."""
        return f"http://127.0.0.1:{self.ports[replica]}"

    def pid(self, replica: int) -> int | None:
        with self._lock:
            process = self.processes[replica]
            return process.pid if process is not None and process.poll() is None else None

    def start(self) -> Gateways:
        for replica in range(len(self.ports)):
            self._spawn(replica)
        self._keeper.start()
        return self

    def wait_healthy(self, timeout_s: float = 120.0) -> None:
        """Until every replica answers ``/health`` with 200; :class:`TimeoutError` with the ones that do not."""
        deadline = time.monotonic() + timeout_s
        while not all(self.healthy(r) for r in range(len(self.ports))):
            if time.monotonic() > deadline:
                sick = [self.url(r) for r in range(len(self.ports)) if not self.healthy(r)]
                raise TimeoutError(f"gateway replica(s) {', '.join(sick)} not healthy within {timeout_s:g} s")
            time.sleep(0.2)

    def healthy(self, replica: int) -> bool:
        """Whether the replica answers ``/health`` with 200 (a live group serves)."""
        try:
            return httpx.get(f"{self.url(replica)}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self, replica: int) -> int | None:
        """SIGKILL the replica's process (the keeper starts it again); its pid, None if none ran."""
        pid = self.pid(replica)
        if pid is None:
            return None
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        return pid

    def stop(self) -> None:
        """Stop the keeper, then every replica (SIGTERM, then SIGKILL after 10 s)."""
        self._stopping.set()
        if self._keeper.is_alive():
            self._keeper.join()
        with self._lock:
            live = [p for p in self.processes if p is not None and p.poll() is None]
        for process in live:
            process.send_signal(signal.SIGTERM)
        for process in live:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _spawn(self, replica: int) -> None:
        env = dict(os.environ, TPQ_REDIS_URL=self.redis_url, **GATEWAY_ENV)
        if self.log_level:
            env["TPQ_LOG_LEVEL"] = self.log_level
        process = subprocess.Popen([sys.executable, "-m", "common.cli", "gateway", "--port", str(self.ports[replica])],
                                   env=env, stdout=subprocess.DEVNULL, preexec_fn=signal_on_parent_death(signal.SIGTERM))
        with self._lock:
            self.processes[replica] = process
            self.starts[replica] += 1

    def _keep(self) -> None:
        """Start every replica that exited again, until :meth:`stop`."""
        while not self._stopping.wait(0.1):
            for replica, process in enumerate(list(self.processes)):
                if process is not None and process.poll() is not None and not self._stopping.is_set():
                    log.warning("gateway replica %d (pid %d) exited with code %s; starting it again", replica,
                                process.pid, process.returncode)
                    time.sleep(RESTART_PAUSE_S)
                    if not self._stopping.is_set():
                        self._spawn(replica)
