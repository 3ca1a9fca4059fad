"""A served model's vocabulary in the gateway: each token id's bytes, as its worker groups published them.

The gateway has no tokenizer; a group writes its model's vocabulary once at
start (:mod:`gpu_worker.serve.vocab_publish`, which documents the hash's
fields) and :class:`VocabularyCache` reads it once per model and keeps it in
memory, checking at most every :data:`RECHECK_S` seconds whether a group
published another (a content digest). :class:`Vocabulary` names tokens the
way OpenAI's logprobs do: ``token`` is the token's text, ``bytes`` its UTF-8
bytes; a token that is only part of a character (a byte-level BPE piece of
an emoji, say) is named ``bytes:\\xf0\\x9f`` and its ``bytes`` say exactly
which.
"""
from __future__ import annotations

import codecs
import json
import sys
import time
from array import array
from collections.abc import Iterable, Mapping
from typing import Any

from common import keys

RECHECK_S = 30.0
"""Seconds a cached vocabulary is used before the gateway checks its digest in Redis again."""
FORMAT = b"1"


class VocabularyError(ValueError):
    """A vocabulary hash in Redis that this gateway cannot read."""


class Vocabulary:
    """One model's tokens: ``bytes_of(i)``, ``token_text(i)``, ``decode(ids)``; ids ``0 .. size - 1``."""

    def __init__(self, model: str, token_bytes: list[bytes], special_ids: Iterable[int] = (), digest: str = "") -> None:
        self.model, self.digest = model, digest
        self._bytes = token_bytes
        self.special_ids = frozenset(special_ids)
        self._texts: dict[int, str] = {}

    @property
    def size(self) -> int:
        """How many ids the vocabulary has."""
        return len(self._bytes)

    def bytes_of(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for (``b""`` for an id past the vocabulary, such as padding)."""
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def token_text(self, token_id: int) -> str:
        """The token as logprobs name it: its text, or ``bytes:\\xNN...`` when its bytes are not whole UTF-8."""
        text = self._texts.get(token_id)
        if text is None:
            raw = self.bytes_of(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._texts[token_id] = text
        return text

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` (special tokens included), invalid or incomplete UTF-8 as U+FFFD."""
        return b"".join(self.bytes_of(i) for i in ids).decode("utf-8", errors="replace")

    def unknown_ids(self, ids: Iterable[int]) -> list[int]:
        """The distinct ids of ``ids`` past the vocabulary, sorted."""
        return sorted({i for i in ids if not 0 <= i < len(self._bytes)})


def prompt_ids_refusal(vocab: Vocabulary, token_prompts: Iterable[Iterable[int]]) -> str | None:
    """Why token-id prompts cannot run on ``vocab``'s model (the ids past its vocabulary), or None if they can.

    The one check of token-id prompts against a vocabulary: ``POST
    /v1/completions`` answers it as a 400, batch creation as the line's error.
    """
    unknown = vocab.unknown_ids(i for ids in token_prompts for i in ids)
    if not unknown:
        return None
    return (f"prompt holds token ids outside the vocabulary of {vocab.model} [0, {vocab.size}): "
            f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")


class TextOffsets:
    """Characters of text so far as tokens' bytes are added: ``text_offset`` of completions' logprobs.

    ``add(token_id)`` returns where the token's text starts: the characters
    the bytes before it decode to (an incomplete character not counted
    yet). ``count_special=False`` counts special tokens as no text, as the
    generated text (decoded with ``skip_special_tokens``) has none of them.
    """

    def __init__(self, vocab: Vocabulary, start: int = 0, *, count_special: bool = True) -> None:
        self.vocab, self.chars, self.count_special = vocab, start, count_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> int:
        """The offset of ``token_id``'s text; then count it."""
        offset = self.chars
        if self.count_special or token_id not in self.vocab.special_ids:
            self.chars += len(self._decoder.decode(self.vocab.bytes_of(token_id)))
        return offset


def parse_vocabulary(fields: Mapping[Any, bytes]) -> Vocabulary:
    """The :class:`Vocabulary` in a vocabulary hash's fields (bytes or str keys); :class:`VocabularyError` if bad."""
    get = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    if get.get("format") != FORMAT:
        raise VocabularyError(f"vocabulary format {get.get('format')!r} is not {FORMAT!r} (a newer worker wrote it?)")
    try:
        count = int(get["count"])
        lengths = array("I")
        lengths.frombytes(get["lengths"])
        if sys.byteorder == "big":
            lengths.byteswap()
        data, special = get["data"], json.loads(get["special"])
        model, digest = get["model"].decode("utf-8"), get["digest"].decode()
    except (KeyError, ValueError, UnicodeDecodeError) as e:
        raise VocabularyError(f"the vocabulary hash is unreadable: {e!r}") from None
    if len(lengths) != count or sum(lengths) != len(data):
        raise VocabularyError(f"the vocabulary hash is inconsistent: {count} ids, {len(lengths)} lengths, "
                              f"{sum(lengths)} bytes of lengths, {len(data)} bytes of data")
    token_bytes, at = [], 0
    for length in lengths:
        token_bytes.append(data[at:at + length])
        at += length
    return Vocabulary(model, token_bytes, special, digest)


class VocabularyCache:
    """The vocabularies of the models this gateway served, read from Redis once each (per :data:`RECHECK_S`)."""

    def __init__(self, recheck_s: float = RECHECK_S) -> None:
        self.recheck_s = recheck_s
        self._cached: dict[str, tuple[float, Vocabulary]] = {}

    def peek(self, model: str) -> Vocabulary | None:
        """``model``'s vocabulary if this gateway read it already (no I/O), else None."""
        cached = self._cached.get(model)
        return cached[1] if cached is not None else None

    async def get(self, conn: Any, model: str) -> Vocabulary | None:
        """``model``'s vocabulary (``conn``: an asyncio Redis client); None when no group published one."""
        now = time.monotonic()
        cached = self._cached.get(model)
        if cached is not None and now - cached[0] < self.recheck_s:
            return cached[1]
        key = keys.vocab(model)
        if cached is not None:
            digest = await conn.hget(key, "digest")
            if digest is not None and digest.decode() == cached[1].digest:
                self._cached[model] = (now, cached[1])
                return cached[1]
        fields = await conn.hgetall(key)
        if not fields:
            return cached[1] if cached is not None else None  # deleted under us: what we read still holds
        vocab = parse_vocabulary(fields)
        self._cached[model] = (now, vocab)
        return vocab
