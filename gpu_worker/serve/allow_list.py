"""The allow-list: an rq job class that imports no function or callback tpqueue did not name.

A stock rq worker imports whatever dotted name a job hash holds, for the job
function and for its success/failure/stopped callbacks (rq 2.12
``rq/job.py``: ``Job.func`` and the ``*_callback`` properties, all through
``rq.utils.import_attribute``), so anyone who can write to Redis can make it
run ``os.system``. :class:`AllowListedJob` refuses every name that is not in
:data:`ALLOWED_FUNCS` before anything is imported, and never sends the HTTP
webhooks (rq 2.12 ``Job.webhooks``) a job hash may name. Together with
:func:`common.pickle_guard.disable_pickle` (unpickling raises in the
process, so a pickle payload written into a job hash can never run code)::

    disable_pickle()  # once, at worker start
    Worker(queues, connection=conn, serializer=JSONSerializer, job_class=AllowListedJob)
"""
from __future__ import annotations

import logging
from typing import Any

from rq.job import Job
from rq.utils import import_attribute

from common.errors import TpqError
from common.jobs import GENERATE_FUNC
from common.rq_internals import callback_names

log = logging.getLogger(__name__)

ALLOWED_FUNCS: frozenset[str] = frozenset({GENERATE_FUNC})
"""The dotted names a tpqueue worker resolves, as job function or callback. Nothing else is imported."""

MAX_SHOWN_CHARS = 200
"""Of a foreign name or id quoted in an error: a hostile job must not copy its payload around."""


class ForbiddenJobFunction(TpqError):
    """A job names a function or callback that is not on :data:`ALLOWED_FUNCS`; nothing was imported."""

    def __init__(self, func_name: object, role: str = "function", reason: str = "is not on the allow-list") -> None:
        shown = repr(func_name)
        if len(shown) > MAX_SHOWN_CHARS:
            shown = shown[:MAX_SHOWN_CHARS] + "..."
        allowed = ", ".join(sorted(ALLOWED_FUNCS)) or "nothing"
        super().__init__(
            f"refusing job {role} {shown}: it {reason} (allowed: {allowed}); a tpqueue worker only runs "
            "jobs enqueued by producer.client.Client, so this job is foreign or corrupt"
        )
        self.func_name = func_name
        self.role = role


def check_allowed(func_name: object, role: str = "function") -> str:
    """``func_name`` if it is on :data:`ALLOWED_FUNCS`; else raise :class:`ForbiddenJobFunction`."""
    if not isinstance(func_name, str) or func_name not in ALLOWED_FUNCS:
        raise ForbiddenJobFunction(func_name, role)
    return func_name


class AllowListedJob(Job):
    """An rq ``Job`` that resolves only allow-listed functions and callbacks (pass it as ``job_class=``).

    ``func`` raises :class:`ForbiddenJobFunction`, before importing anything,
    when the function name is not on :data:`ALLOWED_FUNCS`, when the job is a
    bound method (a non-null ``instance``), or when any callback name is
    forbidden, so such a job fails before its body could run. The callback
    properties refuse the same way unless the callback is unset. A job whose
    ``data`` cannot be decoded fails with rq's ``DeserializationError``.
    """

    @property
    def func(self) -> Any:
        return import_attribute(self.allowed_func_name())

    def allowed_func_name(self) -> str:
        """The job's function name if the job may run; else raise :class:`ForbiddenJobFunction`. Imports nothing.

        A job may run when it names an allow-listed function, is not bound to
        an instance, and names no callback off the allow-list.
        """
        func_name = check_allowed(self.func_name)
        if self.instance is not None:
            raise ForbiddenJobFunction(
                func_name, reason=f"is bound to an instance of {type(self.instance).__name__}, not a module function"
            )
        for role, name in callback_names(self).items():
            if name:
                check_allowed(name, role)
        return func_name

    @property
    def success_callback(self) -> Any:
        return _resolve_callback(callback_names(self)["success callback"], "success callback")

    @property
    def failure_callback(self) -> Any:
        return _resolve_callback(callback_names(self)["failure callback"], "failure callback")

    @property
    def stopped_callback(self) -> Any:
        return _resolve_callback(callback_names(self)["stopped callback"], "stopped callback")

    def send_webhooks(self, status: Any, *, exc_string: str | None = None) -> None:
        """Never sends: a webhook is an HTTP request to any URL a Redis writer chose, from the worker's network."""
        if self.webhooks:
            log.error("job %s: not sending its %d webhook(s): tpqueue jobs have none, so this job is foreign or "
                      "corrupt", self.id, len(self.webhooks))

    def execute_failure_callback(self, death_penalty_class: Any, *exc_info: Any) -> None:
        # rq's StartedJobRegistry.cleanup calls this outside any try; a raise there would stop the worker.
        if self._refused_callback("failure callback"):
            return
        super().execute_failure_callback(death_penalty_class, *exc_info)

    def execute_stopped_callback(self, death_penalty_class: Any) -> None:
        if self._refused_callback("stopped callback"):
            return
        super().execute_stopped_callback(death_penalty_class)

    def _refused_callback(self, role: str) -> bool:
        """True (and logged) when the ``role`` callback is set and forbidden: the caller skips the callback."""
        name = callback_names(self)[role]
        if not name:
            return False
        try:
            check_allowed(name, role)
        except ForbiddenJobFunction as e:
            log.error("job %s: not running its %s: %s", self.id, role, e)
            return True
        return False


def _resolve_callback(name: str | None, role: str) -> Any:
    if not name:
        return None
    return import_attribute(check_allowed(name, role))
