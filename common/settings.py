"""tpqueue's settings: one validated object, read from ``TPQ_*`` environment variables.

Every field ``x`` can be set with the environment variable ``TPQ_X`` (any
case) or as a keyword argument of :func:`get_settings`; keyword arguments
win. A misspelt ``TPQ_*`` variable or keyword is an error, never silently
ignored. :func:`get_settings` reports every bad value at once, naming the
environment variable to fix.
"""
from __future__ import annotations

import difflib
import os
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Mapping

import platformdirs
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.errors import InvalidConfigError
from common.key_names import MAX_NUM_SHARDS
from common.redis_conn import parse_redis_url, redact_url

ENV_PREFIX = "TPQ_"
APP_NAME = "tpqueue"
DAY_S = 24 * 3600
MAX_TTL_S = 365 * DAY_S

DEFAULT_SUPERVISOR_METRICS_PORT = 9460
DEFAULT_WORKER_METRICS_PORT = 9461

# TPQ_* variables that other parts of tpqueue read and that are not settings.
NON_SETTINGS_ENV_VARS: frozenset[str] = frozenset()


class LogFormat(str, Enum):
    """How log lines are written: human-readable text or one JSON object per line."""

    TEXT = "text"
    JSON = "json"


class LogLevel(str, Enum):
    """The lowest level of log line that is written."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME))


class Settings(BaseSettings):
    """Every tunable of tpqueue, validated. Build it with :func:`get_settings`.

    Immutable; ``settings.model_copy(update={...})`` gives a changed copy
    (unvalidated: prefer ``get_settings(**changes)``). Its repr hides the
    Redis password.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="forbid",
        frozen=True,
        validate_default=True,
        env_ignore_empty=True,
        allow_inf_nan=False,
        hide_input_in_errors=True,  # an error must not print a URL with its password
    )

    redis_url: str | None = Field(
        None,
        description="Redis to use (redis://, rediss:// or unix:// URL). None: start an embedded "
        "redis-server with its data in data_dir.",
    )
    cpu_kernels: Literal["1", "0"] = Field(
        "1", description="Fused C kernels for CPU steps (gpu_worker/kernels): '1' builds them with the system C "
        "compiler at first start (cached in cache_dir) and uses them, '0' runs torch ops only.",
    )
    cache_dir: Path | None = Field(
        None, description="Where models are downloaded and converted. None: the user cache dir."
    )
    calibrate: Literal["1", "0", "refresh"] = Field(
        "1", description="Kernel calibration at engine start (bf16/fp16 on CPU): '1' measures once per CPU and "
        "caches it in cache_dir, '0' skips it (the model dtype's kernels), 'refresh' measures again.",
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir, description="Where the embedded redis-server keeps its data (AOF)."
    )
    num_shards: int = Field(
        64, ge=1, le=MAX_NUM_SHARDS,
        description="Number of session shards (queues gen.0 .. gen.N-1). Fixed for a deployment's life.",
    )
    result_ttl_s: int = Field(DAY_S, ge=1, le=MAX_TTL_S, description="Seconds a finished job's result is kept.")
    failure_ttl_s: int = Field(7 * DAY_S, ge=1, le=MAX_TTL_S, description="Seconds a failed job is kept.")
    token_log_maxlen: int = Field(
        8192, ge=1, le=1_000_000,
        description="Entries kept in a job's durable token log (must exceed max_tokens_limit).",
    )
    token_log_ttl_s: int = Field(DAY_S, ge=1, le=MAX_TTL_S, description="Seconds a job's token log is kept.")
    heartbeat_interval_s: float = Field(1.0, gt=0, le=60, description="Seconds between a rank's heartbeats.")
    heartbeat_ttl_s: float = Field(
        5.0, gt=0, le=600,
        description="Seconds a heartbeat lives; a group whose heartbeat expires is declared dead.",
    )
    hang_timeout_s: float = Field(
        30.0, gt=0, le=DAY_S,
        description="Seconds a group may hold jobs without advancing its step before it is declared hung.",
    )
    max_prompt_chars: int = Field(100_000, ge=1, le=10_000_000, description="Longest prompt accepted, in characters.")
    max_tokens_limit: int = Field(4096, ge=1, le=1_000_000, description="Largest max_tokens a request may ask for.")
    max_batch_size: int = Field(10_000, ge=1, le=1_000_000, description="Most jobs in one submit_batch call.")
    max_queue_depth: int = Field(
        10_000, ge=1, le=100_000_000, description="Most queued jobs per queue; beyond it submit says 'queue full'."
    )
    job_retries: int = Field(
        3, ge=1, le=100, description="Times a job is requeued after its worker died or hung (rq Retry max)."
    )
    model: str = Field(
        "smollm2-135m-instruct", min_length=1, max_length=4096,
        description="Model name known to the model store, or a path to a checkpoint.",
    )
    tp: int = Field(1, ge=1, le=64, description="Tensor-parallel ranks per worker group.")
    supervisor_metrics_port: int = Field(
        DEFAULT_SUPERVISOR_METRICS_PORT, ge=0, le=65535,
        description="Port of the supervisor's Prometheus /metrics; 0 turns it off.",
    )
    worker_metrics_port: int = Field(
        DEFAULT_WORKER_METRICS_PORT, ge=0, le=65535,
        description="Port of a worker group's Prometheus /metrics (served by its rank 0; `tpq up` gives group i "
        "this port + i); 0 turns it off.",
    )
    metrics_host: str = Field(
        "0.0.0.0", min_length=1, max_length=255,
        description="Address the /metrics servers listen on (0.0.0.0: every interface; 127.0.0.1: this host only).",
    )
    http_host: str = Field(
        "127.0.0.1", min_length=1, max_length=255,
        description="Address the OpenAI-compatible gateway listens on (`tpq gateway --host`); a non-loopback "
        "address needs an API key (`tpq keys create`) or http_allow_anonymous.",
    )
    http_port: int = Field(
        8000, ge=0, le=65535,
        description="Port of the OpenAI-compatible gateway (`tpq gateway --port`; `tpq up --http-port`); 0: "
        "`tpq up` starts no gateway.",
    )
    http_allow_anonymous: bool = Field(
        False, description="Let the gateway listen on a non-loopback address without API keys (anyone who reaches "
        "the port can submit jobs).",
    )
    client_pool_size: int = Field(
        3, ge=1, le=1024,
        description="Connections an asyncio client (and so a gateway) uses for its commands; its streams share "
        "one more (pub/sub) and its result waits another, however many there are.",
    )
    http_disconnect_grace_s: float = Field(
        10.0, ge=0, le=DAY_S,
        description="Seconds a streamed completion runs on after its HTTP client disconnects, waiting for a resume "
        "(Last-Event-ID); then it is cancelled. 0 cancels at once.",
    )
    http_max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, le=1024**3,
        description="Largest HTTP request body the gateway reads; a bigger one gets 413.",
    )
    http_max_file_bytes: int = Field(
        200 * 1024 * 1024, ge=1024, le=512 * 1024**2,
        description="Largest file the gateway's Batch API accepts (POST /v1/files); a bigger one gets 413.",
    )
    http_batch_lease_s: float = Field(
        10.0, ge=0.5, le=600,
        description="Seconds a gateway replica's lease on a Batch API batch lasts unrenewed; after a replica dies, "
        "another carries its batches on once this passes.",
    )
    log_format: LogFormat = Field(LogFormat.TEXT, description="'text' or 'json' log lines.")
    log_level: LogLevel = Field(LogLevel.INFO, description="DEBUG, INFO, WARNING or ERROR.")

    def __init__(self, **values: Any) -> None:
        reject_unknown_env_vars(os.environ)
        super().__init__(**values)

    @field_validator("redis_url")
    @classmethod
    def _redis_url_is_usable(cls, url: str | None) -> str | None:
        if url is not None:
            parse_redis_url(url)
        return url

    @field_validator("cache_dir", "data_dir")
    @classmethod
    def _expand_home(cls, path: Path | None) -> Path | None:
        return path.expanduser() if path is not None else None

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_log_format(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _settings_fit_together(self) -> Settings:
        if self.heartbeat_ttl_s < 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_ttl_s ({self.heartbeat_ttl_s}) must be at least twice heartbeat_interval_s "
                f"({self.heartbeat_interval_s}), or one late heartbeat declares a live group dead"
            )
        if self.hang_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"hang_timeout_s ({self.hang_timeout_s}) must exceed heartbeat_interval_s "
                f"({self.heartbeat_interval_s})"
            )
        if self.token_log_maxlen <= self.max_tokens_limit:
            raise ValueError(
                f"token_log_maxlen ({self.token_log_maxlen}) must exceed max_tokens_limit "
                f"({self.max_tokens_limit}) so that a job's whole token log survives for resume"
            )
        return self

    @property
    def model_cache_dir(self) -> Path:
        """``cache_dir``, or the user cache directory of tpqueue when it is not set."""
        return self.cache_dir if self.cache_dir is not None else Path(platformdirs.user_cache_dir(APP_NAME))

    def __repr_args__(self):  # type: ignore[no-untyped-def]
        for name, value in super().__repr_args__():
            yield name, (redact_url(value) if name == "redis_url" and value is not None else value)


def env_var_name(field: str) -> str:
    """The environment variable that sets a field: ``num_shards`` -> ``TPQ_NUM_SHARDS``."""
    return f"{ENV_PREFIX}{field.upper()}"


def valid_env_vars() -> list[str]:
    """Every ``TPQ_*`` environment variable tpqueue understands, sorted."""
    return sorted({env_var_name(f) for f in Settings.model_fields} | NON_SETTINGS_ENV_VARS)


def reject_unknown_env_vars(environ: Mapping[str, str]) -> None:
    """Raise :class:`InvalidConfigError` if ``environ`` has a ``TPQ_*`` variable tpqueue does not know.

    The message names each unknown variable, suggests a close valid name,
    and lists the valid ones.
    """
    valid = valid_env_vars()
    unknown = sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in valid)
    if not unknown:
        return
    problems = []
    for name in unknown:
        close = difflib.get_close_matches(name.upper(), valid, n=1)
        problems.append(f"{name} (did you mean {close[0]}?)" if close else name)
    raise InvalidConfigError(
        f"unknown environment variable{'s' if len(unknown) > 1 else ''} {', '.join(problems)}; "
        f"unset it or use one of: {', '.join(valid)}"
    )


def get_settings(**overrides: Any) -> Settings:
    """Settings from the ``TPQ_*`` environment, with ``overrides`` (field names) taking precedence.

    Raises :class:`InvalidConfigError` naming every unknown variable or
    keyword and every bad value, with the environment variable that sets it.
    """
    try:
        return Settings(**overrides)
    except ValidationError as e:
        raise InvalidConfigError(_describe(e)) from e


def _describe(error: ValidationError) -> str:
    lines = []
    for err in error.errors(include_input=False, include_url=False):
        field = str(err["loc"][0]) if err["loc"] else ""
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(field, list(Settings.model_fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"unknown setting {field!r}{hint}; valid settings: {', '.join(Settings.model_fields)}")
        elif field:
            lines.append(f"{env_var_name(field)} ({field}): {_message(err)}")
        else:
            lines.append(_message(err))
    return "invalid tpqueue settings:\n  " + "\n  ".join(lines)


def _message(err: Any) -> str:
    return str(err["msg"]).removeprefix("Value error, ")
