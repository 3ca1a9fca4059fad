"""Where a running ``tpq up`` stack can be found, so other ``tpq`` commands need no configuration.

``tpq up`` writes ``<data_dir>/stack.json`` (its Redis URL and pid) while it
runs and removes it when it stops. :func:`redis_url_for` gives a command the
Redis to use: ``TPQ_REDIS_URL`` if set, else that of the local stack.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from common.errors import InvalidConfigError
from common.settings import Settings

STACK_FILE = "stack.json"


def stack_file(settings: Settings) -> Path:
    """The file a running ``tpq up`` describes itself in."""
    return settings.data_dir / STACK_FILE


def write_stack_file(settings: Settings, redis_url: str) -> Path:
    """Record this process as the local stack serving ``redis_url`` (readable by the user only)."""
    path = stack_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"redis_url": redis_url, "pid": os.getpid()}))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


def remove_stack_file(settings: Settings) -> None:
    stack_file(settings).unlink(missing_ok=True)


def local_stack_url(settings: Settings) -> str | None:
    """The Redis URL of a ``tpq up`` running on this machine for this user, or None."""
    try:
        info = json.loads(stack_file(settings).read_text())
        pid, url = int(info["pid"]), str(info["redis_url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # a stack that died without cleaning up
    except PermissionError:
        pass
    return url


def redis_url_for(settings: Settings, command: str) -> str:
    """``TPQ_REDIS_URL``, else the local stack's URL; a clear error when there is neither."""
    if settings.redis_url is not None:
        return settings.redis_url
    url = local_stack_url(settings)
    if url is None:
        raise InvalidConfigError(
            f"tpq {command}: no Redis to use: set TPQ_REDIS_URL, or start the local stack with `tpq up` "
            f"(it records its Redis in {stack_file(settings)})"
        )
    return url
