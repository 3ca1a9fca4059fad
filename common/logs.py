"""How every tpq process logs: text or one JSON object per line, Redis passwords never shown.

:func:`configure_logging` is called once per process (``common.cli`` for
every ``tpq`` command, and each spawned rank); the format comes from
``--log-format`` / ``TPQ_LOG_FORMAT``. :func:`job_event` writes the one line
per job lifecycle event (claimed, started, resumed, finished, cancelled,
expired, failed, requeued) with the job id, its queue (shard), group and
rank, as text and as JSON fields.

Every formatted line passes through :func:`redact`, which hides the
password of any ``redis://``, ``rediss://`` or ``unix://`` URL in it
(:func:`common.redis_conn.redact_url`), including in tracebacks.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

from common.redis_conn import redact_url

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_URL = re.compile(r"\b(?:rediss?|unix)://[^\s'\"<>,;)\]}]+", re.IGNORECASE)
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def redact(text: str) -> str:
    """``text`` with the password of every Redis URL in it replaced by ``***``."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text) if "://" in text else text


class RedactingFormatter(logging.Formatter):
    """The plain text format, with Redis passwords redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, ``pid``, ``thread``, any ``extra``
    fields (a job event's ``event``, ``job_id``, ``queue``, ``group``, ``rank``, ...) and ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
            "pid": record.process,
            "thread": record.threadName,
        }
        for name, value in vars(record).items():
            if name not in _RECORD_FIELDS and name not in entry:
                entry[name] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(entry, default=str)


class _TpqHandler(logging.StreamHandler):
    """The handler :func:`configure_logging` installs (so that a second call replaces it)."""


def configure_logging(level: str | None = None, fmt: str | None = None, *, force: bool = False) -> None:
    """Log to stderr from the root logger. ``level``/``fmt`` default to ``TPQ_LOG_LEVEL``/``TPQ_LOG_FORMAT``
    (INFO, text); unknown values fall back to those defaults (the settings report them).

    Like ``logging.basicConfig``, it leaves a root logger that already has
    another handler alone (an application embedding tpqueue, pytest),
    unless ``force``.
    """
    logging.getLogger("rq.worker").setLevel(logging.WARNING)  # tpqueue logs each job's lifecycle itself
    root = logging.getLogger()
    foreign = [h for h in root.handlers if not isinstance(h, _TpqHandler)]
    if foreign and not force:
        return
    level = (level or os.environ.get("TPQ_LOG_LEVEL") or "INFO").upper()
    fmt = (fmt or os.environ.get("TPQ_LOG_FORMAT") or "text").lower()
    handler = _TpqHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else RedactingFormatter(TEXT_FORMAT))
    for old in list(root.handlers):
        if isinstance(old, _TpqHandler) or force:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if level in LOG_LEVELS else "INFO")


def job_event(logger: logging.Logger, event: str, job_id: str, *, queue: str | None, group: str | None,
              rank: int | None = 0, level: int = logging.INFO, **details: Any) -> None:
    """Log one job lifecycle ``event`` as ``job <id> <event>: queue=... group=... rank=... k=v ...``.

    In JSON the same facts are fields: ``event`` (``job.<event>``),
    ``job_id``, ``queue``, ``group``, ``rank`` and each of ``details``.
    """
    if not logger.isEnabledFor(level):
        return
    fields = {"queue": queue, "group": group, "rank": rank, **details}
    text = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    logger.log(level, "job %s %s: %s", job_id, event, text,
               extra={"event": f"job.{event}", "job_id": job_id, **fields})
