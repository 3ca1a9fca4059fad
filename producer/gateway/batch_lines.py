"""OpenAI Batch API lines, checked and rendered (no I/O): shared by the gateway's batches and ``tpq batch``.

An input line is ``{"custom_id", "method": "POST", "url", "body"}``, where
``url`` is the batch's endpoint (``/v1/chat/completions`` or
``/v1/completions``) and ``body`` is what that endpoint takes, checked by
:func:`producer.gateway.params.parse_chat` / ``parse_completion`` (so a
line is refused for exactly what the endpoint refuses; ``stream: true`` is
refused too; so are ``logprobs`` and ``echo`` unless the caller renders
them, as the gateway's batches do and ``tpq batch`` does not: see
``rendering``). :func:`parse_lines` checks a whole file and returns every
problem with its line number, as OpenAI's ``errors.data[]``
(``{code, message, param, line}``); :func:`vocabulary_error` checks a
line against its model's vocabulary (token-id prompts), which the caller
reads. A line becomes one job per choice with
ids derived from a base id (:func:`producer.gateway.records.job_ids`), and
its outcome renders as OpenAI's output line (:func:`output_line`): ``body``
is exactly the non-streamed endpoint's answer, rendered by the same
:func:`~producer.gateway.responses.completion_response` (with the model's
vocabulary and the echoed prompts, for lines that ask for logprobs or echo).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from common.errors import TpqError
from common.results import JobResult
from common.schemas import GenerationRequest
from producer.gateway.errors import APIError, from_tpq_error
from producer.gateway.params import Completion, Kind, parse_chat, parse_completion
from producer.gateway.records import CompletionRecord, job_ids, record_of
from producer.gateway.responses import completion_response
from producer.gateway.vocab import Vocabulary, prompt_ids_refusal

MAX_LINES = 50_000
"""Most requests in one batch input file (OpenAI's limit)."""
MAX_ERRORS = 1000
"""Most per-line validation errors reported for one file (the rest are counted in the last one)."""
MAX_CUSTOM_ID_CHARS = 512

ENDPOINTS: dict[str, Kind] = {"/v1/chat/completions": "chat", "/v1/completions": "text"}
"""The batch endpoints served, and the kind of completion each line is."""
_PARSERS: dict[Kind, Callable[[Any], Completion]] = {"chat": parse_chat, "text": parse_completion}


@dataclass(frozen=True)
class LineError:
    """One problem of an input file, as OpenAI's ``errors.data[]`` item (``line`` counts from 1)."""

    code: str
    message: str
    line: int | None = None
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """OpenAI's ``{code, message, param, line}``."""
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True)
class BatchLine:
    """One checked input line: its number (from 1), ``custom_id``, the endpoint's kind, and the request."""

    number: int
    custom_id: str
    kind: Kind
    completion: Completion
    body: dict[str, Any]

    def record(self, base_id: str, created: int) -> CompletionRecord:
        """The completion this line runs as: id ``base_id``, one job per choice, rendered as the endpoint's."""
        return record_of(self.completion, base_id, created)

    @property
    def reads_vocabulary(self) -> bool:
        """Whether checking or rendering it reads its model's vocabulary (token ids to check, logprobs, echo)."""
        return self.renders_with_vocabulary or bool(self.completion.token_prompts)

    @property
    def renders_with_vocabulary(self) -> bool:
        """Whether its answer needs its model's vocabulary: logprobs, or an echoed token-id prompt."""
        c = self.completion
        return c.logprobs is not None or (c.echo and bool(c.token_prompts))

    @property
    def renders_more(self) -> bool:
        """Whether its answer shows logprobs or echoes its prompt (what ``tpq batch`` does not render)."""
        return self.completion.logprobs is not None or self.completion.echo

    def job_ids(self, base_id: str) -> list[str]:
        """The ids of this line's jobs: ``base_id``, or ``<base_id>-<i>`` for several choices."""
        return job_ids(base_id, self.completion.num_jobs)

    def requests(self, build: Callable[..., GenerationRequest], base_id: str) -> list[GenerationRequest]:
        """This line's jobs, built by ``build`` (a client's ``build_request``), all at ``priority="batch"``."""
        c = self.completion
        return [build(**c.job_fields(choice), session_id=c.session_id, request_id=job_id, priority="batch")
                for choice, job_id in enumerate(self.job_ids(base_id))]

    def as_json(self) -> str:
        """The line as stored for later (re-checked by :func:`line_from_json`)."""
        return json.dumps({"n": self.number, "custom_id": self.custom_id, "kind": self.kind, "body": self.body},
                          separators=(",", ":"), ensure_ascii=False)


def line_from_json(raw: str | bytes) -> BatchLine:
    """A line stored by :meth:`BatchLine.as_json` (it was checked before it was stored)."""
    item = json.loads(raw)
    completion = _PARSERS[item["kind"]](item["body"])
    return BatchLine(item["n"], item["custom_id"], item["kind"], completion, item["body"])


def is_openai_line(item: Any) -> bool:
    """Whether a decoded JSONL line is in OpenAI's batch format (it has ``custom_id`` or ``url`` and ``body``)."""
    return isinstance(item, dict) and ("custom_id" in item or ("url" in item and "body" in item))


def parse_line(text: str, number: int, endpoint: str | None, served_models: Collection[str] | None = None, *,
               rendering: bool = False) -> BatchLine | LineError:
    """Check one input line against the batch's ``endpoint`` (None: the line's own ``url``, if served).

    ``rendering``: whether the caller renders logprobs and echo (it reads the
    models' vocabularies); else a line that asks for them is refused.
    """
    try:
        item = json.loads(text)
    except ValueError as e:
        return LineError("invalid_json_line", f"line {number} is not valid JSON: {e}", number)
    if not isinstance(item, dict):
        return LineError("invalid_request", f"line {number} must be a JSON object", number)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError("missing_required_parameter", f"line {number} has no custom_id (a non-empty string)",
                         number, "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return LineError("invalid_value", f"line {number}: custom_id is over {MAX_CUSTOM_ID_CHARS} characters",
                         number, "custom_id")
    if item.get("method") != "POST":
        return LineError("invalid_value", f"line {number}: method must be \"POST\", got {item.get('method')!r}",
                         number, "method")
    url = item.get("url")
    if url not in ENDPOINTS or (endpoint is not None and url != endpoint):
        expected = endpoint or " or ".join(ENDPOINTS)
        return LineError("invalid_url", f"line {number}: url {url!r} is not the batch's endpoint ({expected})",
                         number, "url")
    body = item.get("body")
    if not isinstance(body, dict):
        return LineError("invalid_request", f"line {number}: body must be a JSON object", number, "body")
    if body.get("stream") not in (None, False):
        return LineError("invalid_value", f"line {number}: a batch line cannot ask for stream: true", number,
                         "body.stream")
    kind = ENDPOINTS[url]
    try:
        completion = _PARSERS[kind](body)
    except APIError as e:
        return LineError(e.code or "invalid_request", f"line {number}: {e.message}", number,
                         f"body.{e.param}" if e.param else "body")
    if not rendering and (completion.logprobs is not None or completion.echo):  # needs the vocabulary
        param = "body.echo" if completion.echo else "body.logprobs"
        return LineError("unsupported_parameter", f"line {number}: logprobs and echo are not served in local "
                                                  "batches; send them through the gateway", number, param)
    if served_models is not None and completion.model not in served_models:
        served = ", ".join(sorted(served_models)) or "none"
        return LineError("model_not_found", f"line {number}: the model {completion.model!r} is not served here "
                                            f"(served: {served})", number, "body.model")
    return BatchLine(number, custom_id, kind, completion, body)


def vocabulary_error(line: BatchLine, vocab: Vocabulary | APIError) -> LineError | None:
    """The error of ``line`` against its model's vocabulary (the APIError saying why none is published), or None.

    A token id past the vocabulary is refused as ``POST /v1/completions``
    refuses it (:func:`~producer.gateway.vocab.prompt_ids_refusal`). With no
    vocabulary published (the model's groups predate publishing one, or are
    still starting), a line that needs it to render its answer
    (logprobs, an echoed token-id prompt) is refused with the endpoint's
    reason, but a plain token-id prompt is not: the ids cannot be checked
    here, so the worker checks them when the line runs, and an id past the
    model's vocabulary fails that line alone (a 400 in the error file).
    """
    if isinstance(vocab, APIError):
        if not line.renders_with_vocabulary:
            return None
        param = "body.logprobs" if line.completion.logprobs is not None else "body.echo"
        return LineError(vocab.code or "vocabulary_unavailable", f"line {line.number}: {vocab.message}",
                         line.number, param)
    refusal = prompt_ids_refusal(vocab, line.completion.token_prompts)
    if refusal is None:
        return None
    return LineError("invalid_value", f"line {line.number}: {refusal}", line.number, "body.prompt")


def capped(errors: list[LineError]) -> list[LineError]:
    """``errors`` as reported: at most :data:`MAX_ERRORS`, the last one counting those left out."""
    if len(errors) <= MAX_ERRORS:
        return errors
    left = len(errors) - MAX_ERRORS + 1
    return errors[:MAX_ERRORS - 1] + [LineError("too_many_errors", f"{left} more lines have errors")]


def parse_lines(data: bytes, endpoint: str | None, served_models: Collection[str] | None = None, *,
                rendering: bool = False) -> tuple[list[BatchLine], list[LineError]]:
    """Every line of a JSONL file checked: the good lines, and every problem (empty when all are good).

    Blank lines are skipped. Also refused: a file that is not UTF-8, more
    than :data:`MAX_LINES` requests, a repeated ``custom_id``, no request at
    all, and (with ``endpoint`` None) lines whose ``url`` differ;
    ``rendering`` as :func:`parse_line`'s.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return [], [LineError("invalid_file", f"the file is not UTF-8 text: {e}")]
    rows = text.splitlines()
    total = sum(1 for raw in rows if raw.strip())
    if total > MAX_LINES:  # refused before any line is parsed
        return [], [LineError("too_many_lines", f"the file holds {total} requests; at most {MAX_LINES} are allowed "
                                                "in one batch")]
    lines: list[BatchLine] = []
    errors: list[LineError] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(rows, start=1):
        if not raw.strip():
            continue
        parsed = parse_line(raw, number, endpoint, served_models, rendering=rendering)
        if isinstance(parsed, BatchLine) and parsed.custom_id in seen:
            parsed = LineError("duplicate_custom_id", f"line {number}: custom_id {parsed.custom_id!r} is already "
                                                      f"used on line {seen[parsed.custom_id]}", number, "custom_id")
        if isinstance(parsed, LineError):
            errors.append(parsed)
            continue
        seen[parsed.custom_id] = number
        endpoint = endpoint or next(u for u, k in ENDPOINTS.items() if k == parsed.kind)
        lines.append(parsed)
    if not lines and not errors:
        errors.append(LineError("empty_file", "the file holds no request"))
    return lines, capped(errors)


# ------------------------------------------------------------------ output


def request_line_id(base_id: str) -> str:
    """The ``id`` of a line's output (``batch_req_<hash>``), the same whoever renders it."""
    return "batch_req_" + hashlib.blake2b(base_id.encode(), digest_size=12).hexdigest()


def output_line(line: BatchLine, base_id: str, created: int, outcomes: Sequence[JobResult | TpqError], *,
                vocab: Vocabulary | None = None, echoes: list[str] | None = None) -> tuple[dict[str, Any], bool]:
    """OpenAI's output line for ``line``'s job outcomes (in choice order), and whether it is an error line.

    All results: ``response {status_code: 200, request_id, body}`` with the
    endpoint's non-streamed answer (``vocab`` and ``echoes`` as
    :func:`~producer.gateway.responses.completion_response` takes them). A
    job that failed (or was cancelled before it ran): the status and error
    body the endpoint would have answered (``from_tpq_error``), an error line.
    """
    failure = next((o for o in outcomes if isinstance(o, TpqError)), None)
    if failure is not None:
        return error_line(line, base_id, from_tpq_error(failure)), True
    body = completion_response(line.record(base_id, created), list(outcomes),  # type: ignore[arg-type]
                               vocab=vocab, echoes=echoes)
    head = {"id": request_line_id(base_id), "custom_id": line.custom_id}
    return {**head, "response": {"status_code": 200, "request_id": base_id, "body": body}, "error": None}, False


def error_line(line: BatchLine, base_id: str, error: APIError) -> dict[str, Any]:
    """The output line of a request the endpoint would have answered with ``error``."""
    response = {"status_code": error.status, "request_id": base_id, "body": error.body()}
    return {"id": request_line_id(base_id), "custom_id": line.custom_id, "response": response, "error": None}


def unrun_line(custom_id: str, base_id: str, code: str, message: str) -> dict[str, Any]:
    """The error line of a request that never ran (the batch was cancelled or expired first)."""
    return {"id": request_line_id(base_id), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}
