"""The validated shape of one generation request, and the limits a deployment puts on it."""
from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from common import keys
from common.errors import InvalidRequestError
from common.results import ChatMessage
from common.sampling import SamplingParams
from common.settings import Settings

T = TypeVar("T")

Priority = Literal["interactive", "batch"]
MAX_MESSAGES = 4096
"""Most turns in one chat: empty messages count no characters, but each costs template text and tokens."""
MAX_TOKEN_ID = 2**31 - 1
"""The largest token id a request may hold (the worker refuses ids past its model's vocabulary)."""
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID, strict=True)]  # strict: True is no token id

_FIELDS_AT: dict[str, tuple[str, ...]] = {}  # filled below: parent location -> accepted field names


class GenerationRequest(BaseModel):
    """One generation job: a prompt or a chat, sampling parameters and routing hints.

    Exactly one of ``prompt`` (non-empty text), ``messages`` (a non-empty
    chat) and ``prompt_token_ids`` (a non-empty list of the model's token
    ids, used as they are: no special tokens added) is given. ``session_id`` pins the request to a shard (and so to one
    worker group, whose prefix cache then holds the session's history).
    ``priority`` defaults to ``"interactive"`` with a session and ``"batch"``
    without. ``deadline_unix_s`` is a finite Unix time; the client checks that
    it lies in the future at submit time (the schema does not, so that a
    worker can still decode a request whose deadline has passed).
    Build it with :func:`parse_request` to get :class:`InvalidRequestError`
    rather than pydantic's ``ValidationError``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    request_id: str | None = None
    prompt: str | None = Field(None, min_length=1)
    messages: tuple[ChatMessage, ...] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    prompt_token_ids: tuple[TokenId, ...] | None = Field(None, min_length=1)
    session_id: str | None = None
    sampling: SamplingParams = SamplingParams()
    priority: Priority = "batch"
    deadline_unix_s: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_priority(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("priority") is None:
            priority = "interactive" if data.get("session_id") is not None else "batch"
            data = {**data, "priority": priority}
        return data

    @field_validator("request_id")
    @classmethod
    def _request_id_is_usable(cls, request_id: str | None) -> str | None:
        return None if request_id is None else keys.validate_job_id(request_id)

    @field_validator("session_id")
    @classmethod
    def _session_id_is_usable(cls, session_id: str | None) -> str | None:
        return None if session_id is None else keys.validate_session_id(session_id)

    @model_serializer(mode="wrap")
    def _omit_absent_token_ids(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)  # without token ids the wire stays as it was: older workers read it
        if isinstance(data, dict) and data.get("prompt_token_ids", 0) is None:
            del data["prompt_token_ids"]
        return data

    @model_validator(mode="after")
    def _one_input(self) -> GenerationRequest:
        given = [name for name in ("prompt", "messages", "prompt_token_ids") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of prompt, messages and prompt_token_ids, not both {' and '.join(given)}")
        if not given:
            raise ValueError("give a prompt (text), messages (a chat) or prompt_token_ids; neither was given")
        return self

    @model_validator(mode="after")
    def _text_is_valid_unicode(self) -> GenerationRequest:
        texts = [("prompt", self.prompt), ("session_id", self.session_id)]
        texts += [(f"messages.{i}.content", m.content) for i, m in enumerate(self.messages or ())]
        texts += [(f"sampling.stop.{i}", s) for i, s in enumerate(self.sampling.stop)]
        for where, text in texts:
            if text is not None and not _encodes_as_utf8(text):
                raise ValueError(f"{where}: holds a lone surrogate, which is not valid Unicode; send UTF-8 text")
        return self

    @property
    def input_chars(self) -> int:
        """Size of the input: the prompt's characters, the sum of the messages' contents, or the token ids."""
        if self.prompt is not None:
            return len(self.prompt)
        if self.prompt_token_ids is not None:
            return len(self.prompt_token_ids)  # a token stands for at least one character, mostly more
        return sum(len(m.content) for m in self.messages or ())

    @property
    def input_name(self) -> str:
        """Which input the request holds: ``prompt``, ``messages`` or ``prompt_token_ids``."""
        if self.prompt is not None:
            return "prompt"
        return "prompt_token_ids" if self.prompt_token_ids is not None else "messages"


def _encodes_as_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_FIELDS_AT.update({
    "": tuple(GenerationRequest.model_fields),
    "sampling": tuple(SamplingParams.model_fields),
    "messages": tuple(ChatMessage.model_fields),
})


def parse_request(data: Any, *, what: str = "request") -> GenerationRequest:
    """Validate ``data`` (a mapping or a :class:`GenerationRequest`) into a request.

    Raises :class:`InvalidRequestError` whose message names every bad field
    (``what`` prefixes it, e.g. ``"request 3"``) without echoing its value.
    """
    if isinstance(data, GenerationRequest):
        return data
    if not isinstance(data, dict):
        raise InvalidRequestError(f"{what} must be a mapping of fields, got {type(data).__name__}")
    return validate_or_raise(GenerationRequest.model_validate, data, f"invalid {what}")


def validate_or_raise(validate: Callable[[Any], T], data: Any, problem: str) -> T:
    """``validate(data)``; a pydantic error becomes :class:`InvalidRequestError` ``"<problem>: <summary>"``.

    The summary (:func:`describe_validation_error`) names the bad fields without echoing their values.
    """
    try:
        return validate(data)
    except ValidationError as e:
        raise InvalidRequestError(f"{problem}: {describe_validation_error(e)}") from None


def describe_validation_error(error: ValidationError) -> str:
    """A one-line, value-free summary of a pydantic error: ``field: problem; field: problem``."""
    problems = []
    for err in error.errors(include_input=False, include_url=False, include_context=False):
        loc = ".".join(str(part) for part in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent = str(err["loc"][0]) if len(err["loc"]) > 1 else ""
            accepted = _FIELDS_AT.get(parent)
            msg = f"unknown field; accepted: {', '.join(accepted)}" if accepted else "unknown field"
        problems.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(problems)


def check_limits(request: GenerationRequest, settings: Settings) -> GenerationRequest:
    """Return ``request`` if it fits the deployment's limits, else raise :class:`InvalidRequestError`.

    Checks the input size against ``settings.max_prompt_chars`` (a token-id
    prompt's number of ids too) and
    ``sampling.max_tokens`` against ``settings.max_tokens_limit``. A request
    that left ``max_tokens`` at its default gets the limit instead when the
    default is over it (a deployment with ``TPQ_MAX_TOKENS_LIMIT=100`` serves
    ``submit("hi")``); only an explicit ``max_tokens`` over the limit is refused.
    """
    chars = request.input_chars
    if chars > settings.max_prompt_chars:
        unit = "token ids" if request.prompt_token_ids is not None else "characters"
        raise InvalidRequestError(
            f"the {request.input_name} total {chars} {unit}; "
            f"at most {settings.max_prompt_chars} are allowed (TPQ_MAX_PROMPT_CHARS)"
        )
    sampling = request.sampling
    if sampling.max_tokens > settings.max_tokens_limit and "max_tokens" not in sampling.model_fields_set:
        capped = sampling.model_copy(update={"max_tokens": settings.max_tokens_limit})
        request = request.model_copy(update={"sampling": capped})
    if request.sampling.max_tokens > settings.max_tokens_limit:
        raise InvalidRequestError(
            f"max_tokens is {request.sampling.max_tokens}; at most {settings.max_tokens_limit} "
            "are allowed (TPQ_MAX_TOKENS_LIMIT)"
        )
    return request
