"""Test doubles shared by several test modules: stand-ins for parts of tpqueue that a test does not run."""
from __future__ import annotations

from typing import Any


class StubEngineLoop:
    """The engine loop's inbox only: records the request id of every command the job pump submits, in order.

    No model runs, so an admitted job stays running until the test finishes it;
    a job admitted twice (a retry, a resumed run) appears twice.
    """

    def __init__(self) -> None:
        self.admitted: list[str] = []

    def submit(self, command: Any) -> None:
        self.admitted.append(command.request_id)
