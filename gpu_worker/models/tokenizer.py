"""Text and token ids for one model: prompts, chat templates and streaming detokenization.

`Tokenizer` wraps the model directory's transformers fast tokenizer.
`IncrementalDetokenizer` turns one sequence's sampled ids into text deltas
that are always whole characters.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from pydantic import ValidationError
from tokenizers import decoders
from transformers import AutoTokenizer

from common.errors import InvalidRequestError, ModelNotFoundError
from common.results import ChatMessage

logger = logging.getLogger("tpqueue.tokenizer")

REPLACEMENT_CHAR = "\ufffd"
MESSAGE_SHAPE = "{'role': 'system' | 'user' | 'assistant', 'content': str}"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback tokens


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character that stands for each byte -> that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_level_alphabet()


class Tokenizer:
    """The tokenizer of a model directory: encode prompts and chats, decode ids.

    Attributes:
        eos_token_ids: every id that ends a generation: the union of config.json's
            and generation_config.json's ``eos_token_id`` (an int or a list) and
            the tokenizer's own eos token.
        vocab_size: how many ids the tokenizer knows, added tokens included
            (``len(tokenizer)``); the model's embedding may be padded larger.
        special_token_ids: ids of the added tokens marked special (``<|im_end|>``...),
            the ones ``skip_special_tokens`` drops.
    """

    def __init__(self, model_dir: str | os.PathLike) -> None:
        self.model_dir = Path(model_dir)
        try:
            self._hf = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"cannot load a tokenizer from {self.model_dir}: {exc}; a model directory "
                                     "needs tokenizer.json and tokenizer_config.json") from exc
        if not self._hf.is_fast:
            raise ModelNotFoundError(f"{self.model_dir} has no fast tokenizer; tpqueue needs tokenizer.json")
        self._backend = self._hf.backend_tokenizer
        self._decoder = self._backend.decoder
        self.special_token_ids = frozenset(i for i, tok in self._hf.added_tokens_decoder.items() if tok.special)
        self.eos_token_ids = _eos_token_ids(self.model_dir, self._hf.eos_token_id)
        self.vocab_size = len(self._hf)
        self._added_ids = frozenset(self._hf.added_tokens_decoder)
        self._byte_level = isinstance(self._decoder, decoders.ByteLevel)
        logger.debug("loaded tokenizer of %s: %d ids, eos %s", self.model_dir, self.vocab_size,
                     sorted(self.eos_token_ids))

    @property
    def chat_template(self) -> str | None:
        """The model's Jinja chat template, or None when it has none."""
        return self._hf.chat_template

    def encode(self, text: str) -> list[int]:
        """Token ids of a plain prompt, with whatever special tokens the model's tokenizer adds by default.

        SmolLM2 (like other ChatML byte-level BPE models) adds nothing, neither
        BOS nor EOS: ``encode("Hello world") == [19556, 905]``. A Llama-2-style
        tokenizer with ``add_bos_token`` would prepend BOS here.
        """
        if not isinstance(text, str):
            raise InvalidRequestError(f"a prompt must be a str, got {type(text).__name__}")
        return self._hf.encode(text)

    def render_chat(self, messages: Sequence[ChatMessage | Mapping[str, Any]]) -> str:
        """The chat template applied to `messages`, ending with the assistant's generation prompt."""
        if self.chat_template is None:
            raise InvalidRequestError(
                f"model {self.model_dir} has no chat template (neither chat_template in tokenizer_config.json "
                "nor chat_template.jinja); send a plain prompt instead of messages")
        chat = _chat_dicts(messages)
        try:
            return self._hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:
            raise InvalidRequestError(f"the model's chat template rejected these messages: {exc}") from exc

    def encode_chat(self, messages: Sequence[ChatMessage | Mapping[str, Any]]) -> list[int]:
        """Token ids of `messages` rendered with the chat template (``add_generation_prompt=True``).

        The rendered text carries its own special tokens, so none are added
        (transformers' ``apply_chat_template`` does the same). Raises
        `InvalidRequestError` when the model has no template or a message is
        not a `ChatMessage` or a ``{"role", "content"}`` dict.
        """
        return self._hf.encode(self.render_chat(messages), add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`; without tokenization-space cleanup, so it equals the streamed deltas."""
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens,
                               clean_up_tokenization_spaces=False)

    def detokenizer(self, prompt_ids: Sequence[int] | None = None,
                    skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A new `IncrementalDetokenizer` for one sequence."""
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens=skip_special_tokens)

    def token_string(self, token_id: int) -> str | None:
        """The vocabulary string of one id (byte-level form, e.g. ``'Ġthe'``), None for an unknown id."""
        return self._backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes one id stands for in decoded text (None for an unknown id).

        Byte-level BPE (SmolLM2, GPT-2, Qwen2) maps each character of the
        vocabulary string back to its byte (``'Ġhi'`` -> ``b' hi'``);
        SentencePiece-style vocabularies give ``<0xE2>`` byte tokens as that
        byte and ``▁`` as a space. Added tokens (``<|im_end|>``) are their
        text. A token may be part of a character: its bytes are then not
        valid UTF-8 on their own.
        """
        token = self.token_string(token_id)
        if token is None:
            return None
        if token_id in self._added_ids or (self._byte_level and not all(c in _BYTE_OF_CHAR for c in token)):
            return token.encode("utf-8")
        if self._byte_level:
            return bytes(_BYTE_OF_CHAR[c] for c in token)
        byte = _BYTE_TOKEN.fullmatch(token)
        if byte is not None:
            return bytes([int(byte.group(1), 16)])
        return token.replace("\u2581", " ").encode("utf-8")

    def vocabulary_bytes(self) -> list[bytes]:
        """:meth:`token_bytes` of every id ``0 .. vocab_size - 1`` (``b""`` for an id the tokenizer lacks)."""
        return [self.token_bytes(i) or b"" for i in range(self.vocab_size)]

    def join_tokens(self, tokens: list[str]) -> str:
        """Decode vocabulary strings to text with the model's decoder, as ``decode`` does."""
        if self._decoder is None:
            return " ".join(tokens)
        return self._decoder.decode(tokens)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_dir)!r}, vocab_size={self.vocab_size})"


class IncrementalDetokenizer:
    """Text deltas of one sequence, one sampled token at a time (vLLM's scheme).

    It keeps a small window of recent token strings: ``[0:read)`` was already
    emitted and decodes to ``prefix_text``; each `push` decodes the window and
    emits what lies past ``prefix_text``. A decode that ends in U+FFFD means a
    multi-byte character is still incomplete, so nothing is emitted and the
    bytes wait for the next token. After an emission the window restarts at the
    old ``read``, so a push costs a decode of a few tokens, whatever the length.

    ``"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids)``
    for the same ``skip_special_tokens``. Ids the tokenizer does not know
    (a padded embedding) decode to nothing, as in ``decode``. With
    `prompt_ids`, the last `CONTEXT_TOKENS` prompt tokens seed the window, so
    decoders that treat the first token specially (SentencePiece's leading
    space) see the generated text in context.
    """

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None, *,
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._tokens: list[str] = []
        for token_id in list(prompt_ids or ())[-self.CONTEXT_TOKENS:]:
            self._append(token_id)
        self._read = len(self._tokens)
        self._prefix_text = tokenizer.join_tokens(self._tokens)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the new complete text (often "", never a partial character)."""
        if not self._append(token_id):
            return ""
        text = self._tokenizer.join_tokens(self._tokens)
        if len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Return whatever is held back (an unfinished character decodes to U+FFFD, as in ``decode``)."""
        if self._read == len(self._tokens):
            return ""
        return self._emit(self._tokenizer.join_tokens(self._tokens))

    def _append(self, token_id: int) -> bool:
        """Add the token's string to the window; False for a skipped special or unknown id."""
        if self._skip_special and token_id in self._tokenizer.special_token_ids:
            return False
        token = self._tokenizer.token_string(token_id)
        if token is None:
            return False
        self._tokens.append(token)
        return True

    def _emit(self, text: str) -> str:
        """Return the part of `text` past the emitted prefix and restart the window at the old read offset."""
        delta = text[len(self._prefix_text):]
        self._tokens = self._tokens[self._read:]
        self._read = len(self._tokens)
        self._prefix_text = self._tokenizer.join_tokens(self._tokens)
        return delta


def _chat_dicts(messages: Sequence[ChatMessage | Mapping[str, Any]]) -> list[dict[str, str]]:
    """Check `messages` and turn each into a plain ``{"role", "content"}`` dict for the template."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidRequestError(f"messages must be a list of {MESSAGE_SHAPE}, got {type(messages).__name__}")
    if not messages:
        raise InvalidRequestError("a chat needs at least one message")
    return [_chat_dict(index, message) for index, message in enumerate(messages)]


def _chat_dict(index: int, message: ChatMessage | Mapping[str, Any]) -> dict[str, str]:
    """One message as a dict, validated by `ChatMessage`."""
    if isinstance(message, Mapping):
        try:
            message = ChatMessage.model_validate(dict(message))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'message'}: {e['msg']}" for e in exc.errors())
            raise InvalidRequestError(f"message {index} is malformed ({problems}); expected {MESSAGE_SHAPE}") from exc
    if not isinstance(message, ChatMessage):
        raise InvalidRequestError(f"message {index} is a {type(message).__name__}; expected {MESSAGE_SHAPE}")
    return {"role": message.role, "content": message.content}


def _eos_token_ids(model_dir: Path, tokenizer_eos: int | None) -> frozenset[int]:
    """Union of config.json's and generation_config.json's eos_token_id and the tokenizer's eos id."""
    ids: set[int] = set() if tokenizer_eos is None else {tokenizer_eos}
    for name in ("config.json", "generation_config.json"):
        value = _read_json(model_dir / name).get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelNotFoundError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}
