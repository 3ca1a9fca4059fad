"""Keeps a worker group running: starts its rank-0 process, and restarts the whole group when it ends.

Rank 0 runs in its own session (process group) with ranks 1.. as its
children, so one ``killpg`` ends every rank, including a hung or stopped
one. A group whose rank dies, hangs, or is fenced exits non-zero and is
started again (new incarnation) after a back-off that doubles from 1 s to
30 s and resets once a run lasted a minute. A stop request (Ctrl-C,
SIGTERM) is passed on as SIGTERM, so rank 0 hands its running jobs back to
their queues; ranks still alive after ``grace_s`` are killed.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time

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
                 restarts_option: str | None = None):
        self.command, self.name, self.grace_s, self.env = command, name, grace_s, env
        self.restarts_option = restarts_option
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
            if time.monotonic() - started > STABLE_RUN_S:
                backoff = BACKOFF_FIRST_S
            self.restarts += 1
            log.warning("group %s exited with code %s; restarting in %.0f s (restart %d)",
                        self.name, code, backoff, self.restarts)
            stop.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_CAP_S)
        return 0

    def _run_once(self, stop: threading.Event) -> int:
        command = [*self.command, self.restarts_option, str(self.restarts)] if self.restarts_option else self.command
        self.process = process = subprocess.Popen(command, start_new_session=True, env=self.env)
        try:
            while (code := process.poll()) is None:
                if stop.wait(POLL_S):
                    return self._stop(process)
            return code
        finally:
            _kill_group(process.pid)  # ranks 1.. of a group whose rank 0 died

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
