"""The one module where tpqueue touches rq internals: an allow-listing job class and a pickle guard.

A stock rq worker imports whatever dotted name a job hash holds, for the job
function and for its success/failure/stopped callbacks (rq 2.12
``rq/job.py``: ``Job.func`` and the ``*_callback`` properties, all through
``rq.utils.import_attribute``), so anyone who can write to Redis can make it
run ``os.system``. :class:`AllowListedJob` refuses every name that is not in
:data:`ALLOWED_FUNCS` before anything is imported. :func:`disable_pickle`
makes unpickling raise in this process, so a pickle payload written into a
job hash can never run code here.

A tpqueue worker uses both::

    disable_pickle()  # once, at worker start
    Worker(queues, connection=conn, serializer=JSONSerializer, job_class=AllowListedJob)
"""
from __future__ import annotations

import _pickle
import logging
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from rq.job import Job
from rq.serializers import DefaultSerializer
from rq.utils import import_attribute

from common.errors import TpqError
from common.jobs import GENERATE_FUNC

log = logging.getLogger(__name__)

ALLOWED_FUNCS: frozenset[str] = frozenset({GENERATE_FUNC})
"""The dotted names a tpqueue worker resolves, as job function or callback. Nothing else is imported."""

_MAX_SHOWN_CHARS = 200


class ForbiddenJobFunction(TpqError):
    """A job names a function or callback that is not on :data:`ALLOWED_FUNCS`; nothing was imported."""

    def __init__(self, func_name: object, role: str = "function", reason: str = "is not on the allow-list") -> None:
        shown = repr(func_name)
        if len(shown) > _MAX_SHOWN_CHARS:
            shown = shown[:_MAX_SHOWN_CHARS] + "..."
        allowed = ", ".join(sorted(ALLOWED_FUNCS)) or "nothing"
        super().__init__(
            f"refusing job {role} {shown}: it {reason} (allowed: {allowed}); a tpqueue worker only runs "
            "jobs enqueued by producer.client.Client, so this job is foreign or corrupt"
        )
        self.func_name = func_name
        self.role = role


class UnpicklingDisabled(TpqError, pickle.UnpicklingError):
    """Something tried to unpickle in a process where :func:`disable_pickle` is active."""


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
        func_name = check_allowed(self.func_name)
        if self.instance is not None:
            raise ForbiddenJobFunction(
                func_name, reason=f"is bound to an instance of {type(self.instance).__name__}, not a module function"
            )
        for role, name in self._callback_names():
            if name:
                check_allowed(name, role)
        return import_attribute(func_name)

    @property
    def success_callback(self) -> Any:
        return _resolve_callback(self._success_callback_name, "success callback")

    @property
    def failure_callback(self) -> Any:
        return _resolve_callback(self._failure_callback_name, "failure callback")

    @property
    def stopped_callback(self) -> Any:
        return _resolve_callback(self._stopped_callback_name, "stopped callback")

    def execute_failure_callback(self, death_penalty_class: Any, *exc_info: Any) -> None:
        # rq's StartedJobRegistry.cleanup calls this outside any try; a raise there would stop the worker.
        if self._refused_callback(self._failure_callback_name, "failure callback"):
            return
        super().execute_failure_callback(death_penalty_class, *exc_info)

    def execute_stopped_callback(self, death_penalty_class: Any) -> None:
        if self._refused_callback(self._stopped_callback_name, "stopped callback"):
            return
        super().execute_stopped_callback(death_penalty_class)

    def _callback_names(self) -> list[tuple[str, str | None]]:
        return [
            ("success callback", self._success_callback_name),
            ("failure callback", self._failure_callback_name),
            ("stopped callback", self._stopped_callback_name),
        ]

    def _refused_callback(self, name: str | None, role: str) -> bool:
        """True (and logged) when ``name`` is set and forbidden: the caller skips the callback."""
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


# ------------------------------------------------------------------ pickle guard

_PATCH_POINTS: tuple[tuple[Any, str], ...] = (
    (pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"),
    (pickle, "_loads"), (pickle, "_load"), (pickle, "_Unpickler"),
    (_pickle, "loads"), (_pickle, "load"), (_pickle, "Unpickler"),
)
_originals: dict[tuple[Any, str], Any] = {}


def _refuse(what: str) -> NoReturn:
    log.error("refused %s: unpickling is disabled in this process", what)
    raise UnpicklingDisabled(
        f"refusing {what}: unpickling is disabled in this tpqueue worker process (disable_pickle()); "
        "tpqueue jobs are JSON (rq JSONSerializer), so a pickle payload here is a foreign or malicious job"
    )


def _refusing_loads(data: Any, /, *args: Any, **kwargs: Any) -> NoReturn:
    _refuse("pickle.loads")


def _refusing_load(file: Any, /, *args: Any, **kwargs: Any) -> NoReturn:
    _refuse("pickle.load")


class _RefusingUnpickler(pickle.Unpickler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _refuse("pickle.Unpickler")


_REPLACEMENTS: dict[str, Any] = {
    "loads": _refusing_loads, "load": _refusing_load, "Unpickler": _RefusingUnpickler,
    "_loads": _refusing_loads, "_load": _refusing_load, "_Unpickler": _RefusingUnpickler,
}


def disable_pickle() -> None:
    """Make every unpickling attempt in this process raise :class:`UnpicklingDisabled`.

    Process-wide and meant to be called once, at worker start, before any
    job is fetched; calling it again does nothing. It replaces ``loads``,
    ``load`` and ``Unpickler`` (and the pure-Python ``_loads``, ``_load``,
    ``_Unpickler``) in ``pickle`` and ``_pickle``, and rq's
    ``DefaultSerializer.loads`` (which bound ``pickle.loads`` at import).
    Other modules that bound ``pickle.loads`` at their own import keep the
    original; so does any ``Unpickler`` subclass defined before the call.
    Anything in the worker that needs pickle (``torch.load`` without
    ``weights_only``, ``torch.distributed``'s ``*_object`` collectives) fails
    too: tpqueue uses neither. :func:`enable_pickle_for_tests` undoes it.
    """
    if _originals:
        return
    for owner, name in _PATCH_POINTS:
        _originals[(owner, name)] = getattr(owner, name)
        setattr(owner, name, _REPLACEMENTS[name])
    _originals[(DefaultSerializer, "loads")] = DefaultSerializer.__dict__["loads"]
    DefaultSerializer.loads = staticmethod(_refusing_loads)  # type: ignore[assignment]
    log.info("unpickling disabled in this process")


def enable_pickle_for_tests() -> None:
    """Undo :func:`disable_pickle` (for tests; a worker never re-enables pickle). Idempotent."""
    while _originals:
        (owner, name), original = _originals.popitem()
        setattr(owner, name, original)


def is_pickle_disabled() -> bool:
    """Whether :func:`disable_pickle` is in effect."""
    return bool(_originals)


@contextmanager
def pickle_disabled() -> Iterator[None]:
    """:func:`disable_pickle` for the ``with`` block; restores pickle after, unless it was already disabled."""
    was_disabled = is_pickle_disabled()
    disable_pickle()
    try:
        yield
    finally:
        if not was_disabled:
            enable_pickle_for_tests()
