"""common.parent_death: a child started with the hook dies with its parent, even one killed with SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from common.parent_death import signal_on_parent_death

PARENT = """
import subprocess, sys, time
from common.parent_death import signal_on_parent_death
hook = signal_on_parent_death() if sys.argv[1] == "hooked" else None
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=hook)
print(child.pid, flush=True)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie (exited, not yet reaped by init) counts as gone
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def orphan_after_parent_sigkill(mode: str) -> int:
    """Start a parent that starts a child, SIGKILL the parent; the child's pid."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    return child_pid


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_hooked_child_dies_with_its_killed_parent_and_an_unhooked_one_lives_on() -> None:
    hooked, unhooked = orphan_after_parent_sigkill("hooked"), orphan_after_parent_sigkill("plain")
    try:
        deadline = time.monotonic() + 10
        while alive(hooked) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(hooked), "the hooked child outlived its SIGKILLed parent"
        assert alive(unhooked)  # what the hook prevents: the test can tell the difference
    finally:
        for pid in (hooked, unhooked):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_hook_is_a_callable_on_linux() -> None:
    hook = signal_on_parent_death(signal.SIGTERM)
    assert (hook is not None) == sys.platform.startswith("linux")
