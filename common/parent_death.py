"""Children that do not outlive the process that started them, even when it is killed with SIGKILL.

Linux's ``PR_SET_PDEATHSIG`` sends a signal to a child when the *thread*
that forked it exits, so :func:`signal_on_parent_death` is for children
started from a thread that lives as long as they should: the main thread,
or a guard thread that runs until the parent stops them anyway.
"""
from __future__ import annotations

import ctypes
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def signal_on_parent_death(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when its parent thread dies.

    None off Linux (the child then outlives a killed parent, as before).
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # loaded here: the forked child only calls it
    option, number = ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(int(sig))

    def preexec() -> None:
        prctl(option, number)

    return preexec
