"""Reading a raw server-sent-event body in the gateway's tests."""
from __future__ import annotations

import json
from collections.abc import Iterator


def sse_events(lines: Iterator[str]) -> Iterator[dict]:
    """The events of an SSE body's lines: ``{"id": ..., "data": ...}`` each (comment lines skipped)."""
    event: dict = {}
    for line in lines:
        if not line:
            if event:
                yield event
            event = {}
        elif line.startswith("id: "):
            event["id"] = line[4:]
        elif line.startswith("data: "):
            event["data"] = line[6:]


def content_of(event: dict) -> str | None:
    """A chat chunk event's delta content (None for a role-less finish, usage or ``[DONE]``)."""
    if event["data"] == "[DONE]":
        return None
    data = json.loads(event["data"])
    return data["choices"][0]["delta"].get("content") if data.get("choices") else None
