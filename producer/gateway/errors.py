"""The gateway's errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with its status.

:class:`APIError` is what every route raises for a request it cannot
serve; :func:`from_tpq_error` maps the client's named exceptions
(:mod:`common.errors`) onto the status codes the OpenAI SDK turns into its
exception classes (400 BadRequestError, 404 NotFoundError, 429
RateLimitError, 5xx InternalServerError).
"""
from __future__ import annotations

from typing import Any

from common.errors import (
    InvalidRequestError,
    JobCancelled,
    JobFailed,
    JobNotFound,
    QueueFull,
    ResultTimeout,
    TpqError,
)
from common.redis_conn import RedisUnavailableError

RETRY_AFTER_S = 1
"""Seconds a client is told to wait (``Retry-After``) after a full queue."""

_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
          429: "rate_limit_exceeded", 503: "service_unavailable"}


class APIError(Exception):
    """An HTTP error answer: ``status``, OpenAI's ``message``/``type``/``param``/``code``, extra ``headers``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI's API sends with this error."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    """A 400 that names the offending parameter."""
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, why: str = "") -> APIError:
    """A 400 for a parameter tpqueue does not implement (``param`` names it)."""
    detail = f": {why}" if why else ""
    return APIError(400, f"{param} is not supported by tpqueue{detail}", param=param, code="unsupported_parameter")


def not_found(message: str, param: str | None = None) -> APIError:
    """A 404 (an unknown model or completion id)."""
    return APIError(404, message, param=param, code="not_found")


def from_tpq_error(error: TpqError) -> APIError:
    """The HTTP error for one of the client's named exceptions."""
    if isinstance(error, InvalidRequestError):
        return bad_request(str(error), code="invalid_request")
    if isinstance(error, QueueFull):
        return APIError(429, f"{error}; retry after {RETRY_AFTER_S} s", code="queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(error, JobNotFound):
        return not_found(str(error))
    if isinstance(error, RedisUnavailableError):
        return APIError(503, f"Redis is unreachable: {error}", code="redis_unavailable")
    if isinstance(error, JobCancelled):
        return APIError(409, str(error), code="cancelled", type_="conflict_error")
    if isinstance(error, ResultTimeout):
        return APIError(504, str(error), code="timeout", type_="timeout_error")
    if isinstance(error, JobFailed) and error.refused:  # too long a prompt for the model, say: the client's fault
        return bad_request(f"the job failed: {error.error or error}", code="request_refused_by_model")
    if isinstance(error, JobFailed):
        return APIError(500, f"the job failed: {error.error or error}", code="job_failed")
    return APIError(500, str(error), code="internal_error")
