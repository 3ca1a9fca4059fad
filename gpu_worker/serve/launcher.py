"""Keeps a worker group running: starts its rank-0 process, and restarts the whole group when it ends.

Rank 0 runs in its own session (process group) with ranks 1.. as its
children, so one ``killpg`` ends every rank, including a hung or stopped
one. A group whose rank dies, hangs, or is fenced exits non-zero and is
started again (new incarnation) after a back-off that doubles from 1 s to
30 s while the group keeps failing before it is ready, and starts over at
1 s after a run that got ready (rank 0 writes a byte to the pipe named by
``ready_option``) or lasted a minute: a group killed while it serves comes
back at once, a group that cannot start does not spin. A stop request (Ctrl-C,
SIGTERM) is passed on as SIGTERM, so rank 0 hands its running jobs back to
their queues; ranks still alive after ``grace_s`` are killed.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import threading
import time

from common.parent_death import signal_on_parent_death

log = logging.getLogger(__name__)

BACKOFF_FIRST_S, BACKOFF_CAP_S, STABLE_RUN_S = 1.0, 30.0, 60.0
POLL_S = 0.2


class GroupLauncher:
    """Runs ``command`` (rank 0 of one group) until stopped, restarting it whenever it exits on its own.

    With ``restarts_option`` (e.g. ``--restarts``), each start appends that
    option and how many times the group was restarted so far, so rank 0 can
    report it (``tpq_group_restarts_total``).
    """

    def __init__(self, command: list[str], name: str, grace_s: float = 60.0, env: dict[str, str] | None = None,
                 restarts_option: str | None = None, ready_option: str | None = None):
        self.command, self.name, self.grace_s, self.env = command, name, grace_s, env
        self.restarts_option, self.ready_option = restarts_option, ready_option
        self.last_run_ready = False
        self.restarts = 0
        self.process: subprocess.Popen | None = None

    def run(self, stop: threading.Event, restart: bool = True) -> int:
        """Run until ``stop`` is set (returns 0) or, with ``restart=False``, until the group exits (its code)."""
        backoff = BACKOFF_FIRST_S
        while not stop.is_set():
            started = time.monotonic()
            code = self._run_once(stop)
            if stop.is_set():
                return 0
            if not restart:
                return code
            if self.last_run_ready or time.monotonic() - started > STABLE_RUN_S:
                backoff = BACKOFF_FIRST_S
            self.restarts += 1
            log.warning("group %s exited with code %s; restarting in %.0f s (restart %d)",
                        self.name, code, backoff, self.restarts)
            stop.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_CAP_S)
        return 0

    def _run_once(self, stop: threading.Event) -> int:
        command = [*self.command, self.restarts_option, str(self.restarts)] if self.restarts_option else self.command
        self.last_run_ready = False
        ready_read = ready_write = None
        if self.ready_option:
            ready_read, ready_write = os.pipe()
            command = [*command, self.ready_option, str(ready_write)]
        try:
            self.process = process = subprocess.Popen(command, start_new_session=True, env=self.env,
                                                      pass_fds=() if ready_write is None else (ready_write,),
                                                      preexec_fn=signal_on_parent_death(signal.SIGTERM))
        finally:
            if ready_write is not None:
                os.close(ready_write)  # the child holds its copy
        try:
            while (code := process.poll()) is None:
                if ready_read is not None and not self.last_run_ready:
                    self.last_run_ready = _readable(ready_read)
                if stop.wait(POLL_S):
                    return self._stop(process)
            if ready_read is not None and not self.last_run_ready:
                self.last_run_ready = _readable(ready_read)  # it got ready, then died before the next poll
            return code
        finally:
            _kill_group(process.pid)  # ranks 1.. of a group whose rank 0 died
            if ready_read is not None:
                os.close(ready_read)

    def _stop(self, process: subprocess.Popen) -> int:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=self.grace_s)
        except subprocess.TimeoutExpired:
            log.warning("group %s did not stop within %.0f s; killing it", self.name, self.grace_s)
            _kill_group(process.pid)
            return process.wait()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _readable(fd: int) -> bool:
    """Whether ``fd`` has a byte to read (rank 0 said it is ready) without blocking."""
    readable, _, _ = select.select([fd], [], [], 0)
    return bool(readable) and os.read(fd, 1) == b"1"
