"""How the client's I/O-free cores meet Redis: the steps a plan yields, and the sync and asyncio runners.

A *plan* is a generator that decides everything without doing I/O itself: it
yields a step (a Redis command, a pipeline of commands, a pause, closing a
pub/sub), is sent the step's reply (or thrown its exception) and returns its
outcome. The sync and asyncio variants of the token-stream reader, the job
handles and the batches run the same plans; they differ only in how they
wait: :func:`run` blocks, :func:`run_async` awaits. redis-py's sync and
asyncio clients have the same command methods, so a step's command is the
same call on either (on asyncio it returns an awaitable).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Call:
    """One Redis command (or pub/sub read): ``command()``, a call on the connection the plan holds."""

    command: Callable[[], Any]


@dataclass(frozen=True, slots=True)
class Pipelined:
    """Commands that ``queue(pipe)`` adds to one non-transactional pipeline of ``conn``: their replies, in order."""

    conn: Any
    queue: Callable[[Any], object]


@dataclass(frozen=True, slots=True)
class Pause:
    """Wait ``seconds`` (a back-off) before the next step."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Close:
    """Close ``pubsub`` and give its connection back; an error doing so is ignored (nothing is left to do)."""

    pubsub: Any


Step = Call | Pipelined | Pause | Close
Plan = Generator[Step, Any, T]
"""A generator that yields :data:`Step` s, is sent their replies, and returns its outcome."""


class Stepper(Generic[T]):
    """Walks a runner through a plan: the next step, then that step's reply or error, until the outcome."""

    __slots__ = ("_plan", "_reply", "_error", "outcome")

    def __init__(self, plan: Plan[T]) -> None:
        self._plan = plan
        self._reply: Any = None
        self._error: BaseException | None = None
        self.outcome: T | None = None

    def step(self) -> Step | None:
        """The plan's next step, or None once it returned (its outcome is then :attr:`outcome`)."""
        reply, error, self._reply, self._error = self._reply, self._error, None, None
        try:
            return self._plan.throw(error) if error is not None else self._plan.send(reply)
        except StopIteration as done:
            self.outcome = done.value
            return None

    def reply(self, value: Any) -> None:
        """What the last step returned: the plan is sent it."""
        self._reply = value

    def fail(self, error: Exception) -> None:
        """What the last step raised: it is raised in the plan, which handles it or lets it out."""
        self._error = error


def run(plan: Plan[T]) -> T:
    """Carry out ``plan`` on sync redis-py connections, blocking at every step; its outcome."""
    stepper = Stepper(plan)
    while (step := stepper.step()) is not None:
        try:
            stepper.reply(_carry_out(step))
        except Exception as e:  # noqa: BLE001 - the plan decides what its step's error means
            stepper.fail(e)
    return stepper.outcome  # type: ignore[return-value]


async def run_async(plan: Plan[T]) -> T:
    """Carry out ``plan`` on ``redis.asyncio`` connections, awaiting every step; its outcome."""
    stepper = Stepper(plan)
    while (step := stepper.step()) is not None:
        try:
            stepper.reply(await _carry_out_async(step))
        except Exception as e:  # noqa: BLE001 - the plan decides what its step's error means
            stepper.fail(e)
    return stepper.outcome  # type: ignore[return-value]


def _carry_out(step: Step) -> Any:
    if isinstance(step, Call):
        return step.command()
    if isinstance(step, Pipelined):
        with step.conn.pipeline(transaction=False) as pipe:
            step.queue(pipe)
            return pipe.execute()
    if isinstance(step, Pause):
        return time.sleep(step.seconds)
    try:
        step.pubsub.close()
    except Exception:  # noqa: BLE001 - closing a broken connection: nothing left to do
        pass
    return None


async def _carry_out_async(step: Step) -> Any:
    if isinstance(step, Call):
        return await step.command()
    if isinstance(step, Pipelined):
        async with step.conn.pipeline(transaction=False) as pipe:
            step.queue(pipe)
            return await pipe.execute()
    if isinstance(step, Pause):
        return await asyncio.sleep(step.seconds)
    try:
        await step.pubsub.aclose()
    except Exception:  # noqa: BLE001 - closing a broken connection: nothing left to do
        pass
    return None
