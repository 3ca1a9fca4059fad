"""gpu_worker.serve.launcher.GroupLauncher with a stand-in rank 0: readiness and the restart back-off."""
from __future__ import annotations

import logging
import re
import sys
import threading

import pytest

from gpu_worker.serve.launcher import GroupLauncher

# A stand-in rank 0: says it is ready through the launcher's pipe (argument "ready") or not, then fails.
RANK0 = ("import os, sys\n"
         "fd = int(sys.argv[sys.argv.index('--ready-fd') + 1])\n"
         "if sys.argv[1] == 'ready':\n"
         "    os.write(fd, b'1')\n"
         "sys.exit(3)\n")


def launcher(mode: str) -> GroupLauncher:
    return GroupLauncher([sys.executable, "-c", RANK0, mode], "g-test", ready_option="--ready-fd")


@pytest.mark.parametrize("mode, ready", [("ready", True), ("never", False)])
def test_the_launcher_knows_whether_the_run_got_ready(mode: str, ready: bool) -> None:
    group = launcher(mode)
    assert group.run(threading.Event(), restart=False) == 3
    assert group.last_run_ready is ready


@pytest.mark.parametrize("mode, backoffs", [("ready", ["1", "1", "1"]), ("never", ["1", "2", "4"])])
def test_the_back_off_starts_over_after_a_run_that_got_ready(mode: str, backoffs: list[str],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    stop = threading.Event()
    group = launcher(mode)
    caplog.set_level(logging.WARNING, logger="gpu_worker.serve.launcher")
    runner = threading.Thread(target=group.run, args=(stop,))
    runner.start()
    try:
        while group.restarts < 3 and runner.is_alive():
            stop.wait(0.05)
    finally:
        stop.set()
        runner.join(timeout=30)
    waits = re.findall(r"restarting in (\d+) s", caplog.text)
    assert waits[:3] == backoffs
