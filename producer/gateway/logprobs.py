"""OpenAI's ``logprobs`` objects, built from tpqueue's :class:`~common.results.TokenLogprob` entries (no I/O).

Chat (``logprobs: true``, ``top_logprobs: k``): ``{"content": [{token,
logprob, bytes, top_logprobs: [{token, logprob, bytes}, ...k]}, ...]}``.

Completions (``logprobs: k``): ``{tokens, token_logprobs, top_logprobs,
text_offset}``, four lists with one item per token; ``top_logprobs[i]`` maps
the ``k`` most likely tokens at that position and the chosen one (so up to
``k + 1``) to their logprobs, as OpenAI's legacy API does; ``text_offset[i]``
is where token ``i``'s text starts in the choice's ``text``. With ``echo``
the prompt's tokens come first, the first of them with ``None`` logprob
(nothing precedes it). Token names come from the model's
:class:`~producer.gateway.vocab.Vocabulary`.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from common.results import TokenLogprob
from common.schemas import GenerationRequest
from producer.gateway.vocab import TextOffsets, Vocabulary


def _named(vocab: Vocabulary, token_id: int, logprob: float | None) -> dict[str, Any]:
    return {"token": vocab.token_text(token_id), "logprob": logprob, "bytes": list(vocab.bytes_of(token_id))}


def chat_entry(vocab: Vocabulary, entry: TokenLogprob) -> dict[str, Any]:
    """One item of a chat choice's ``logprobs.content``."""
    return {**_named(vocab, entry.token_id, entry.logprob),
            "top_logprobs": [_named(vocab, token_id, logprob) for token_id, logprob in entry.top_logprobs]}


def chat_logprobs(vocab: Vocabulary, entries: Iterable[TokenLogprob]) -> dict[str, Any]:
    """A chat choice's (or stream chunk's) ``logprobs``: ``{"content": [...]}``."""
    return {"content": [chat_entry(vocab, entry) for entry in entries]}


class TextLogprobs:
    """A completions choice's ``logprobs``, built token by token: :meth:`extend`, then :meth:`body`."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def extend(self, entries: Iterable[TokenLogprob], offsets: TextOffsets) -> TextLogprobs:
        """Add ``entries`` in order, their text offsets counted by ``offsets``."""
        for entry in entries:
            self.tokens.append(self.vocab.token_text(entry.token_id))
            self.token_logprobs.append(entry.logprob)
            self.top_logprobs.append(self._top(entry))
            self.text_offset.append(offsets.add(entry.token_id))
        return self

    def _top(self, entry: TokenLogprob) -> dict[str, float] | None:
        if entry.logprob is None:
            return None
        top: dict[str, float] = {}
        for token_id, logprob in entry.top_logprobs:
            top.setdefault(self.vocab.token_text(token_id), logprob)
        top.setdefault(self.vocab.token_text(entry.token_id), entry.logprob)  # the chosen token is always there
        return top

    def body(self) -> dict[str, Any]:
        """The ``logprobs`` object."""
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


def generated_offsets(vocab: Vocabulary, start: int) -> TextOffsets:
    """Offsets of generated tokens whose text starts at character ``start`` (special tokens have no text)."""
    return TextOffsets(vocab, start, count_special=False)


def text_choice_logprobs(vocab: Vocabulary, generated: Iterable[TokenLogprob],
                         prompt: Iterable[TokenLogprob] | None = None, echo_text: str = "") -> dict[str, Any]:
    """A whole completions choice's ``logprobs``: the ``prompt``'s tokens first (echo), then ``generated``."""
    body = TextLogprobs(vocab)
    if prompt is not None:
        body.extend(prompt, TextOffsets(vocab))
    return body.extend(generated, generated_offsets(vocab, len(echo_text))).body()


def echo_texts(requests: Iterable[GenerationRequest | None], vocab: Vocabulary | None) -> list[str]:
    """Each job's prompt as ``echo`` shows it: its text, or a token-id prompt's text by ``vocab``.

    A request that is unreadable (None) echoes nothing.
    """
    texts = []
    for request in requests:
        if request is not None and request.prompt_token_ids is not None:
            if vocab is None:
                raise ValueError("echoing a token-id prompt needs the model's vocabulary")
            texts.append(vocab.decode(request.prompt_token_ids))
        else:
            texts.append((request.prompt or "") if request is not None else "")
    return texts
