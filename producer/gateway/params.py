"""An OpenAI request body, checked and translated into tpqueue's request fields (no I/O).

:func:`parse_chat` and :func:`parse_completion` take the decoded JSON body
of ``POST /v1/chat/completions`` and ``POST /v1/completions`` and return a
:class:`Completion`: the parameters every job shares (model, sampling,
session, priority) and one input per prompt. A parameter tpqueue does not
implement, with a value that would change the answer, is refused with a
400 that names it (:data:`UNSUPPORTED`); unknown fields that change nothing
are ignored, as vLLM does. Types are checked strictly (``"5"`` is not a
number). The fields of :class:`~common.schemas.GenerationRequest` are
checked afterwards by the client itself (:meth:`producer.AsyncClient.build_request`).

Logprobs: chat's ``logprobs: true`` (+ ``top_logprobs: 0..20``) and
completions' ``logprobs: 0..20`` (OpenAI allows 5; 20, as vLLM, is what the
engine computes) ask the jobs for ``SamplingParams.logprobs``; completions'
``echo: true`` puts the prompt before the text and, with ``logprobs``, asks
for ``prompt_logprobs`` too. ``max_tokens: 0`` is served with ``echo``
only (the prompt and its logprobs, as evaluation harnesses score a text):
the job generates one token, which the answer leaves out.
``prompt`` may be token ids: a list of ints, or a list of such lists.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.sampling import MAX_LOGPROBS
from common.schemas import MAX_TOKEN_ID, TokenId
from producer.gateway.errors import APIError, bad_request, unsupported

MAX_N = 16
"""Most choices (``n``) one request may ask for; each is its own job."""
MAX_PROMPTS = 64
"""Most prompts in one completions request (``prompt`` as a list)."""

Kind = Literal["chat", "text"]


def _absent(value: Any) -> bool:
    return value is None


def _falsy(value: Any) -> bool:
    return value is None or value is False or value == 0 or value == [] or value == {} or value == ""


def _text_format(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and value.get("type") == "text")


def _is(expected: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or value == expected


# parameter -> (the values that change nothing, why it is refused otherwise). Both endpoints share the table.
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (_falsy, "tool calling is not implemented"),
    "tool_choice": (_is("none"), "tool calling is not implemented"),
    "functions": (_falsy, "function calling is not implemented"),
    "function_call": (_is("none"), "function calling is not implemented"),
    "response_format": (_text_format, "only {\"type\": \"text\"} is served (no JSON mode or schemas)"),
    "suffix": (_falsy, "insertion (suffix) is not implemented"),
    "logit_bias": (_falsy, "logit bias is not implemented"),
    "presence_penalty": (_falsy, "penalties are not implemented; send 0"),
    "frequency_penalty": (_falsy, "penalties are not implemented; send 0"),
    "repetition_penalty": (_is(1), "penalties are not implemented; send 1"),
    "prompt_logprobs": (_falsy, "use echo: true with logprobs (on /v1/completions) for the prompt's logprobs"),
    "best_of": (_is(1), "best_of is not implemented; use n"),
    "min_p": (_falsy, "min_p sampling is not implemented"),
    "min_tokens": (_falsy, "min_tokens is not implemented"),
    "audio": (_absent, "audio output is not implemented"),
    "modalities": (lambda v: v is None or v == ["text"], "only text output is served"),
    "prediction": (_absent, "predicted outputs are not implemented"),
    "web_search_options": (_absent, "web search is not implemented"),
}


class StreamOptions(BaseModel):
    """``stream_options``: whether the stream ends with a usage chunk."""

    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool | None = None


class _Body(BaseModel):
    """The fields both endpoints share; unknown ones are ignored (the unsupported ones were refused first)."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: str = Field(min_length=1)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    priority: Literal["interactive", "batch"] | None = None
    request_id: str | None = None
    session_id: str | None = None


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]
    tool_calls: list[Any] | None = None


class ChatBody(_Body):
    """``POST /v1/chat/completions``."""

    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class CompletionBody(_Body):
    """``POST /v1/completions``: ``prompt`` is text, a list of texts, token ids or a list of token-id lists."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


@dataclass(frozen=True)
class Completion:
    """A checked request: what every job shares, and one input (text or chat) per prompt."""

    kind: Kind
    model: str
    inputs: list[dict[str, Any]]  # {"prompt": text} or {"messages": [...]}, one per prompt
    n: int
    sampling: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    session_id: str | None = None
    priority: str | None = None
    request_id: str | None = None
    logprobs: int | None = None  # alternatives per token (chat's top_logprobs, completions' logprobs); None: off
    echo: bool = False
    prompt_only: bool = False  # max_tokens 0 with echo: the answer leaves out the token each job generates

    @property
    def num_jobs(self) -> int:
        """Jobs this completion runs: ``n`` per prompt."""
        return len(self.inputs) * self.n

    @property
    def token_prompts(self) -> list[list[int]]:
        """The prompts given as token ids, in order (none for text prompts and chat)."""
        return [given["prompt_token_ids"] for given in self.inputs if "prompt_token_ids" in given]

    def job_fields(self, choice: int) -> dict[str, Any]:
        """The input and sampling fields of job ``choice`` (``build_request``'s keyword arguments).

        Choice ``i`` of a seeded request with ``n > 1`` uses ``seed + i % n``:
        reproducible, and not ``n`` equal answers.
        """
        sampling = dict(self.sampling)
        if "seed" in sampling and self.n > 1:
            sampling["seed"] += choice % self.n
        return {**self.inputs[choice // self.n], **sampling}


def _check_supported(body: dict[str, Any]) -> None:
    for name, (harmless, why) in UNSUPPORTED.items():
        if name in body and not harmless(body[name]):
            raise unsupported(name, why)


def _validated(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    _check_supported(body)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None


def _validation_error(error: ValidationError) -> APIError:
    """A 400 naming the first bad parameter (as ``messages.0.content``), and every problem in the message."""
    problems, first = [], None
    for err in error.errors(include_input=False, include_url=False, include_context=False):
        loc = ".".join(str(part) for part in err["loc"] if not str(part).startswith(("function-", "list[", "str")))
        first = first or loc or None
        problems.append(f"{loc}: {str(err['msg']).removeprefix('Value error, ')}" if loc else str(err["msg"]))
    return bad_request("invalid request: " + "; ".join(dict.fromkeys(problems)), param=first)


def _sampling(body: _Body, max_tokens: int | None) -> dict[str, Any]:
    sampling: dict[str, Any] = {}
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "seed", "top_k", "ignore_eos"):
        value = getattr(body, name)
        if value is not None:
            sampling[name] = value
    if body.stop is not None:
        sampling["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop
    if body.stop_token_ids is not None:
        sampling["stop_token_ids"] = body.stop_token_ids
    return sampling


def _common(kind: Kind, body: _Body, inputs: list[dict[str, Any]], max_tokens: int | None,
            **rendering: Any) -> Completion:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed with stream: true", param="stream_options")
    sampling = _sampling(body, max_tokens)
    logprobs, echo = rendering.get("logprobs"), rendering.get("echo", False)
    if logprobs is not None:
        sampling["logprobs"] = logprobs
        if echo:
            sampling["prompt_logprobs"] = logprobs
    return Completion(kind=kind, model=body.model, inputs=inputs, n=body.n, sampling=sampling,
                      stream=body.stream, include_usage=include_usage, session_id=body.session_id or body.user,
                      priority=body.priority, request_id=body.request_id, **rendering)


def _chat_message(i: int, message: _Message) -> dict[str, str]:
    if message.tool_calls:
        raise unsupported(f"messages.{i}.tool_calls", "tool calling is not implemented")
    content = message.content if isinstance(message.content, str) else "".join(p.text for p in message.content)
    role = "system" if message.role == "developer" else message.role
    return {"role": role, "content": content}


def parse_chat(body: Any) -> Completion:
    """The :class:`Completion` of a chat request body; :class:`APIError` (400) for anything refused."""
    if isinstance(body, dict) and isinstance(body.get("messages"), list):
        for i, message in enumerate(body["messages"]):
            role = message.get("role") if isinstance(message, dict) else None
            if role in ("tool", "function"):
                raise unsupported(f"messages.{i}.role", f"{role!r} messages need tool calling, which is not "
                                                        "implemented")
    if isinstance(body, dict) and not _falsy(body.get("echo")):
        raise unsupported("echo", "echo is a /v1/completions parameter; a chat answer has no prompt to echo")
    chat: ChatBody = _validated(ChatBody, body)
    if chat.top_logprobs and not chat.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    messages = [_chat_message(i, m) for i, m in enumerate(chat.messages)]
    max_tokens = chat.max_completion_tokens if chat.max_completion_tokens is not None else chat.max_tokens
    logprobs = (chat.top_logprobs or 0) if chat.logprobs else None
    return _common("chat", chat, [{"messages": messages}], max_tokens, logprobs=logprobs)


def parse_completion(body: Any) -> Completion:
    """The :class:`Completion` of a completions request body; :class:`APIError` (400) for anything refused."""
    token_prompts = None
    if isinstance(body, dict):
        if not _falsy(body.get("top_logprobs")):
            raise unsupported("top_logprobs", "top_logprobs is a chat parameter; /v1/completions takes logprobs: "
                                              "<int> (the alternatives per token)")
        prompt = body.get("prompt")
        token_prompts = _token_prompts(prompt)
        count = len(token_prompts) if token_prompts is not None else len(prompt) if isinstance(prompt, list) else 1
        if count > MAX_PROMPTS:
            raise bad_request(f"prompt holds {count} prompts; at most {MAX_PROMPTS} are allowed", "prompt")
    text: CompletionBody = _validated(CompletionBody, body)
    inputs = ([{"prompt_token_ids": ids} for ids in token_prompts] if token_prompts is not None else
              [{"prompt": p} for p in ([text.prompt] if isinstance(text.prompt, str) else text.prompt)])
    if not inputs:
        raise bad_request("prompt must not be empty", param="prompt")
    max_tokens = text.max_tokens if text.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
    prompt_only = max_tokens == 0
    if prompt_only and not text.echo:
        raise bad_request("max_tokens 0 is served only with echo: true (the prompt and, with logprobs, its "
                          "logprobs, without generating)", param="max_tokens")
    return _common("text", text, inputs, 1 if prompt_only else max_tokens, logprobs=text.logprobs, echo=text.echo,
                   prompt_only=prompt_only)


def _token_prompts(prompt: Any) -> list[list[int]] | None:
    """``prompt`` as token-id lists if it is token ids (a list of ints, or of lists of ints), None if it is not.

    A 400 names what is wrong with a malformed one (an empty list, a negative or non-integer id).
    """
    if not isinstance(prompt, list) or not prompt or all(isinstance(p, str) for p in prompt):
        return None
    if not all(isinstance(p, list) for p in prompt):
        if any(isinstance(p, (str, list)) for p in prompt):
            raise bad_request("prompt mixes texts, token ids and lists; give a text, a list of texts, a list of "
                              "token ids or a list of token-id lists", param="prompt")
        prompt = [prompt]
    for i, ids in enumerate(prompt):
        where = "prompt" if len(prompt) == 1 else f"prompt.{i}"
        if not ids:
            raise bad_request(f"{where} is an empty list of token ids", param="prompt")
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= MAX_TOKEN_ID]
        if bad:
            raise bad_request(f"{where} holds {repr(bad[0])[:20]}; token ids are integers from 0 to {MAX_TOKEN_ID}",
                              param="prompt")
    return prompt


DEFAULT_COMPLETION_MAX_TOKENS = 16
"""OpenAI's (and vLLM's) default ``max_tokens`` for ``/v1/completions``; chat defaults to tpqueue's own."""
