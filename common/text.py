"""Text from Redis replies: redis-py returns ``bytes`` unless a connection decodes responses."""
from __future__ import annotations


def as_text(value: bytes | str) -> str:
    """``value`` as ``str``: UTF-8-decoded if it is ``bytes``, else unchanged."""
    return value.decode() if isinstance(value, bytes) else value


def as_optional_text(value: bytes | str | None) -> str | None:
    """:func:`as_text` of ``value``, or None when Redis returned nothing."""
    return None if value is None else as_text(value)
