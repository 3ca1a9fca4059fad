"""Multi-turn chat on one worker group: :class:`Session`."""
from __future__ import annotations

import uuid
from typing import Any

from common import keys
from common.errors import InvalidRequestError
from common.results import ChatMessage
from producer.client import Client
from producer.handles import JobHandle


class Session:
    """A multi-turn chat whose turns all go to the same worker group.

    Every turn is submitted with the same ``session_id`` (default: a new
    uuid4 hex), so it lands on the same shard queue and, while that group
    lives, on the same worker group, whose KV prefix cache then already holds
    the conversation. Each turn sends the whole :attr:`history` plus the new
    user message. ``system`` (optional) is the first, system message.

    ``reply(text)`` is the simple way: submit, wait, record, return the
    reply. To stream a turn: ``handle = session.send(text)``, iterate
    ``handle.stream()``, then ``session.complete(handle)`` records it.
    History changes only when a turn completes.
    """

    def __init__(self, client: Client, session_id: str | None = None, system: str | None = None) -> None:
        self.client = client
        self.session_id = keys.validate_session_id(session_id) if session_id is not None else uuid.uuid4().hex
        self._history: list[ChatMessage] = []
        if system is not None:
            self._history.append(ChatMessage(role="system", content=_string(system, "system")))

    @property
    def history(self) -> tuple[ChatMessage, ...]:
        """The conversation so far: the system message (if any), then user and assistant turns."""
        return tuple(self._history)

    def send(self, text: str, **options: Any) -> JobHandle:
        """Submit the history plus ``text`` as the next user turn; return its :class:`JobHandle`.

        ``options`` are :meth:`Client.submit` keywords: sampling fields
        (``max_tokens``, ``temperature``, ...), ``deadline_unix_s``,
        ``subscribe``. History is unchanged until :meth:`complete`.
        """
        if "session_id" in options or "messages" in options:
            raise InvalidRequestError("a Session sets session_id and messages itself; pass only sampling options")
        messages = [*self._history, ChatMessage(role="user", content=_string(text, "text"))]
        return self.client.submit(messages=messages, session_id=self.session_id, **options)

    def complete(self, handle: JobHandle, timeout: float | None = None) -> str:
        """Wait for a turn made by :meth:`send`, add it and its reply to the history, and return the reply.

        Raises :class:`InvalidRequestError` if the turn was not sent from
        this history (another turn completed in between, or another
        session's handle); the errors of :meth:`JobHandle.result` otherwise
        (then history is unchanged).
        """
        request = handle.request
        messages = request.messages or ()
        if request.session_id != self.session_id or tuple(messages[:-1]) != tuple(self._history) or not messages:
            raise InvalidRequestError(
                f"job {handle.id!r} was not sent from this session's current history "
                "(another turn completed after it was sent, or it belongs to another session)"
            )
        result = handle.result(timeout)
        self._history += [messages[-1], ChatMessage(role="assistant", content=result.text)]
        return result.text

    def reply(self, text: str, *, timeout: float | None = None, **options: Any) -> str:
        """Send ``text``, wait for the reply (``timeout`` seconds at most), record both turns, return the reply."""
        return self.complete(self.send(text, **options), timeout=timeout)

    def __repr__(self) -> str:
        return f"Session(session_id={self.session_id!r}, turns={len(self._history)})"


def _string(value: Any, what: str) -> str:
    """``value`` if it is a ``str``; :class:`InvalidRequestError` naming ``what`` otherwise."""
    if not isinstance(value, str):
        raise InvalidRequestError(f"{what} must be a string, got {type(value).__name__}")
    return value
