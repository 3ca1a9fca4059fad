"""Unpickling disabled in a whole process: a pickle payload from Redis can never run code in tpqueue.

tpqueue's jobs and results are JSON (rq's ``JSONSerializer``); nothing it
reads from Redis is ever meant to be unpickled. rq can still unpickle on
some paths (its default serializer, ``Group.get_jobs``), so every tpqueue
process that reads Redis and needs no pickle itself calls
:func:`disable_pickle` at start: rank 0 of a worker group once its ranks
are up (:mod:`gpu_worker.serve.group`), and the supervisor and the client
commands (``tpq supervisor``, ``up``, ``demo``, ``generate``, ``chat``,
``batch``, ``status``, ``health``; :mod:`common.cli`). A blocked attempt
raises :class:`UnpicklingDisabled` and logs ``refused pickle...``.
"""
from __future__ import annotations

import _pickle
import logging
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from rq.serializers import DefaultSerializer

from common.errors import TpqError

log = logging.getLogger(__name__)


class UnpicklingDisabled(TpqError, pickle.UnpicklingError):
    """Something tried to unpickle in a process where :func:`disable_pickle` is active."""


_PATCH_POINTS: tuple[tuple[Any, str], ...] = (
    (pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"),
    (pickle, "_loads"), (pickle, "_load"), (pickle, "_Unpickler"),
    (_pickle, "loads"), (_pickle, "load"), (_pickle, "Unpickler"),
)
_originals: dict[tuple[Any, str], Any] = {}


def _refuse(what: str) -> NoReturn:
    log.error("refused %s: unpickling is disabled in this process", what)
    raise UnpicklingDisabled(
        f"refusing {what}: unpickling is disabled in this tpqueue process (disable_pickle()); "
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

    Process-wide and meant to be called once, at process start, before any
    job is read from Redis; calling it again does nothing. It replaces ``loads``,
    ``load`` and ``Unpickler`` (and the pure-Python ``_loads``, ``_load``,
    ``_Unpickler``) in ``pickle`` and ``_pickle``, and rq's
    ``DefaultSerializer.loads`` (which bound ``pickle.loads`` at import).
    Other modules that bound ``pickle.loads`` at their own import keep the
    original; so does any ``Unpickler`` subclass defined before the call.
    Anything in the process that needs pickle (``torch.load`` without
    ``weights_only``, ``torch.distributed``'s ``*_object`` collectives,
    ``multiprocessing``) fails too: a worker group's rank 0 calls it only
    after its ranks started. :func:`enable_pickle_for_tests` undoes it.
    """
    if _originals:
        return
    for owner, name in _PATCH_POINTS:
        _originals[(owner, name)] = getattr(owner, name)
        setattr(owner, name, _REPLACEMENTS[name])
    _originals[(DefaultSerializer, "loads")] = DefaultSerializer.__dict__["loads"]
    DefaultSerializer.loads = staticmethod(_refusing_loads)  # type: ignore[assignment]
    log.debug("unpickling disabled in this process")


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
