"""The text stage: the engine's sampled tokens as text deltas and stop strings, finished requests as results.

The engine hands on token ids only (:class:`SampledToken`,
:class:`FinishedRequest`); this stage, on one thread of its own choosing
(the publisher's when serving, the caller's offline), turns them into
:class:`TokenEvent` objects with text and :class:`GenerationResult`
objects with the final text. Per request it owns an
:class:`IncrementalDetokenizer`, the text so far and a holdback: the last
``max(len(stop)) - 1`` characters stay unsent while they might begin a stop
string.

A stop string ends the request's text just before it. The token that
completed it carries ``finish_reason`` STOP and is the request's last
event; :meth:`TextStage.process` lists the request once in
``TextOutput.stops`` (the caller asks the engine to stop it), and drops
every token the engine sampled after it before the stop reached the engine:
no event carries them, and the result keeps only the tokens up to the stop
(``token_ids``, ``logprobs`` and ``usage.generated_tokens``).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from common.results import FinishReason, GenerationResult, TokenEvent
from common.sampling import SamplingParams
from gpu_worker.engine.llm_engine import FinishedRequest, SampledToken
from gpu_worker.models.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("tpqueue.text")


@dataclass
class TextOutput:
    """What one call of :meth:`TextStage.process` made: events, results, and the requests to stop."""

    events: list[TokenEvent] = field(default_factory=list)
    finished: list[GenerationResult] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)  # a stop string ended them; the engine still runs them


@dataclass
class _Text:
    """One request's text: what is decoded, what was sent, and where its tokens end once the text is final."""

    detokenizer: IncrementalDetokenizer | None  # None once the text is final
    sampling: SamplingParams
    holdback: int              # characters kept back while they might begin a stop string
    text: str = ""
    num_emitted_chars: int = 0
    num_kept: int | None = None  # once final: how many generated tokens the request keeps; later ones are dropped
    stopped: bool = False        # a stop string made the text final


class TextStage:
    """Detokenizes and matches stop strings for the requests :meth:`add` registered (see the module doc).

    ``eos_token_ids``: the engine's; an EOS (unless ``ignore_eos``) or a
    stop token id ends a request without text of its own. Not thread-safe:
    one thread calls every method.
    """

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self._eos_token_ids = frozenset(eos_token_ids)
        self._texts: dict[str, _Text] = {}
        self.dropped_tokens = 0  # sampled after a stop string, never sent

    def add(self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams,
            resume_token_ids: Sequence[int] = ()) -> None:
        """Start the text of a request the engine admitted (replacing any earlier one of the same id).

        ``resume_token_ids`` (a resumed request) rebuild the text an earlier
        run already sent, so the deltas continue it.
        """
        holdback = max((len(s) for s in sampling.stop), default=1) - 1
        state = _Text(IncrementalDetokenizer(self._tokenizer, prompt_token_ids), sampling, holdback)
        for token in resume_token_ids:
            if not self._ends_without_text(token, sampling):
                state.text += state.detokenizer.push(token)
        state.num_emitted_chars = max(0, len(state.text) - holdback)  # what the earlier run streamed
        self._texts[request_id] = state

    def discard(self, request_id: str) -> None:
        """Forget a request without a result (it was given up)."""
        self._texts.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._texts)

    def process(self, tokens: Iterable[SampledToken], finished: Iterable[FinishedRequest]) -> TextOutput:
        """The events of ``tokens`` and the results of ``finished``, in the engine's order (tokens first)."""
        output = TextOutput()
        for token in tokens:
            self._on_token(token, output)
        for done in finished:
            output.finished.append(self._result(done))
        return output

    # -- internals -------------------------------------------------------------
    def _ends_without_text(self, token_id: int, sampling: SamplingParams) -> bool:
        return (token_id in self._eos_token_ids and not sampling.ignore_eos) or token_id in sampling.stop_token_ids

    def _on_token(self, token: SampledToken, output: TextOutput) -> None:
        state = self._texts.get(token.request_id)
        if state is None:  # a request added to the engine behind this stage's back: nothing to send
            return
        if state.num_kept is not None:  # sampled after its stop string, before the engine stopped it
            self.dropped_tokens += 1
            return
        reason = token.finish_reason
        if not self._ends_without_text(token.token_id, state.sampling):
            state.text += state.detokenizer.push(token.token_id)
        if reason is not None:
            state.text += state.detokenizer.flush()
        if state.sampling.stop and self._truncate_at_stop_string(state):
            reason, state.stopped = FinishReason.STOP, True
            if token.finish_reason is None:
                output.stops.append(token.request_id)
        visible_end = len(state.text) if reason else max(state.num_emitted_chars, len(state.text) - state.holdback)
        delta = state.text[state.num_emitted_chars:visible_end]
        state.num_emitted_chars = visible_end
        if reason is not None:
            state.detokenizer, state.num_kept = None, token.index + 1
        logprob = token.logprob
        output.events.append(TokenEvent(
            request_id=token.request_id, index=token.index, token_id=token.token_id, text=delta,
            finish_reason=reason, sampled_at=token.sampled_at,
            logprob=None if logprob is None else logprob.logprob,
            top_logprobs=None if logprob is None else logprob.top_logprobs))

    @staticmethod
    def _truncate_at_stop_string(state: _Text) -> bool:
        """Cut the text at the first stop string past what was sent; True if one was found."""
        search_from = max(0, state.num_emitted_chars - state.holdback)
        hits = [i for s in state.sampling.stop if (i := state.text.find(s, search_from)) >= 0]
        if not hits:
            return False
        state.text = state.text[:min(hits)]
        return True

    def _result(self, done: FinishedRequest) -> GenerationResult:
        state = self._texts.pop(done.request_id, None)
        if state is None:
            log.warning("request %s finished without a text of its own here; decoding its tokens whole",
                        done.request_id)
            return done.result(self._tokenizer.decode(done.token_ids))
        if state.stopped:
            return done.result(state.text, state.num_kept, FinishReason.STOP)
        return done.result(state.text, state.num_kept)
