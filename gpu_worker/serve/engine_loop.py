"""Rank 0's decode loop: the only thread that touches the engine. Redis never runs here.

Other threads hand it commands (:class:`Admit`, :class:`Abort`) through a
thread-safe inbox; it drains the inbox between steps, runs one engine step
whenever there is work, and hands each step's sampled tokens and finished
requests (token ids only: no text is made here) to ``report`` (the
publisher's queue) without waiting on anything. The publisher's text stage
turns them into token events and results; a stop string it finds comes back
as an :class:`Abort` with ``FinishReason.STOP``.
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
from gpu_worker.engine.llm_engine import FinishedRequest, LLMEngine, SampledToken
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
    """What one pass of the loop produced, and then what the publisher writes of it.

    The loop fills ``admitted`` (the requests it added to the engine, in
    order), ``tokens`` and ``done`` (the engine's output: no text) and
    ``rejected``; the publisher's text stage turns ``tokens`` and ``done``
    into ``events`` and ``finished`` before anything is written.
    """

    admitted: list[Admit] = field(default_factory=list)
    tokens: list[SampledToken] = field(default_factory=list)
    done: list[FinishedRequest] = field(default_factory=list)
    events: list[TokenEvent] = field(default_factory=list)
    finished: list[GenerationResult] = field(default_factory=list)
    rejected: list[tuple[str, str, bool]] = field(default_factory=list)  # (request id, why, worth a retry)

    def __bool__(self) -> bool:
        return bool(self.admitted or self.tokens or self.done or self.events or self.finished or self.rejected)


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
                report.tokens.extend(output.tokens)
                report.done.extend(output.finished)
            for done in report.done:
                self._active.discard(done.request_id)
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
            done = self.engine.abort(command.request_id, command.reason)
            if done is not None:
                report.done.append(done)
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
        report.admitted.append(command)
        self._active.add(command.request_id)
        self.in_flight = len(self._active)
