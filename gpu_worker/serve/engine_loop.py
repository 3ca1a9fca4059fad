"""Rank 0's decode loop: the only thread that touches the engine. Redis never runs here.

Other threads hand it commands (:class:`Admit`, :class:`Abort`) through a
thread-safe inbox; it drains the inbox between steps, runs one engine step
whenever there is work, and hands each step's token events and finished
results to ``report`` (the publisher's queue) without waiting on anything.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from common.errors import InvalidRequestError
from common.results import FinishReason, GenerationResult, TokenEvent, TokenLogprob
from common.sampling import SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.sequence import Priority

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05


@dataclass(frozen=True)
class Admit:
    """Start generating for a job (``resume_token_ids``: what an earlier run already streamed).

    ``resume_logprobs``: those tokens' log-probabilities as their logged events carry them, for a job
    that asked for logprobs (see :meth:`LLMEngine.add_request`).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: Priority
    resume_token_ids: list[int] = field(default_factory=list)
    resume_logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Abort:
    """Stop a job now and report its partial result with ``reason``."""

    request_id: str
    reason: FinishReason


@dataclass
class StepReport:
    """What one pass of the loop produced: token events, finished results, and refused admissions."""

    events: list[TokenEvent] = field(default_factory=list)
    finished: list[GenerationResult] = field(default_factory=list)
    rejected: list[tuple[str, str, bool]] = field(default_factory=list)  # (request id, why, worth a retry)

    def __bool__(self) -> bool:
        return bool(self.events or self.finished or self.rejected)


class EngineLoop:
    """Runs ``engine`` on the calling thread until ``stop`` is set; see the module docstring.

    ``steps`` and ``in_flight`` are plain ints other threads may read (the
    heartbeat reports them). An engine failure (a rank died) propagates out
    of :meth:`run`.
    """

    def __init__(self, engine: LLMEngine, report: Callable[[StepReport], None]) -> None:
        self.engine = engine
        self._report = report
        self._inbox: queue.SimpleQueue[Admit | Abort] = queue.SimpleQueue()
        self._active: set[str] = set()
        self.steps = 0
        self.in_flight = 0

    def submit(self, command: Admit | Abort) -> None:
        """Hand a command to the loop (any thread)."""
        self._inbox.put(command)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            report = StepReport()
            self._drain_inbox(report, wait_s=0.0 if self._active else IDLE_WAIT_S)
            if self._active:
                output = self.engine.step()
                self.steps += 1
                report.events.extend(output.events)
                report.finished.extend(output.finished)
            for result in report.finished:
                self._active.discard(result.request_id)
            self.in_flight = len(self._active)
            if report:
                self._report(report)

    def _drain_inbox(self, report: StepReport, wait_s: float) -> None:
        try:
            command = self._inbox.get(timeout=wait_s) if wait_s > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command, report)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: Admit | Abort, report: StepReport) -> None:
        if isinstance(command, Abort):
            result = self.engine.abort(command.request_id, command.reason)
            if result is not None:
                report.finished.append(result)
            return
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.sampling,
                                    command.priority, resume_token_ids=command.resume_token_ids,
                                    resume_logprobs=command.resume_logprobs)
        except InvalidRequestError as exc:  # the request cannot be served here, now or on a retry
            report.rejected.append((command.request_id, str(exc), False))
            return
        except Exception as exc:  # noqa: BLE001 - one request's failure must not take down the group's other jobs
            log.exception("request %s could not be added to the engine", command.request_id)
            report.rejected.append((command.request_id, f"{type(exc).__name__}: {exc}", True))
            return
        self._active.add(command.request_id)
        self.in_flight = len(self._active)
