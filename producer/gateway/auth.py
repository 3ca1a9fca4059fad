"""The gateway's API keys: their records in Redis, and the check every ``/v1`` request passes.

A key is ``tpq-`` and 32 random URL-safe bytes (:func:`secrets.token_urlsafe`),
shown once when it is made (``tpq keys create``). Redis keeps only its
SHA-256 hex digest, its *key id*: ``tpq:keynames`` maps each name to its id,
``tpq:apikey:<id>`` holds the record (:class:`ApiKey`: name, a short prefix
for display, creation time, limits, priority). Keys are random and long, so
a plain SHA-256 is as strong as a slow hash would be.

While no key exists the ``/v1`` routes are open (local use), unless the
gateway listens on a non-loopback address without ``--allow-anonymous``
(``require_keys``: then it answers 401 until a key exists). Once one exists,
every ``/v1`` request needs ``Authorization: Bearer <key>``; a missing,
unknown or revoked key gets 401 in OpenAI's shape (``invalid_api_key``).
``/health``, ``/metrics`` and ``/openapi.json`` stay open, as vLLM's. Each
request reads Redis once (EXISTS of the names and HGETALL of its record, one
round trip), except that "no key exists" is remembered for
:data:`NO_KEYS_TTL_S`: a new key takes effect, and a revoked one stops
working, within that second.
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis
import redis.asyncio

from common import keys
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from common.errors import InvalidRequestError, TpqError
from common.settings import Settings
from common.text import as_text
from producer.gateway.errors import APIError
from producer.gateway.ratelimit import STATE_KEY, KeyContext, RateLimiter, refusal

KEY_PREFIX = "tpq-"
KEY_RANDOM_BYTES = 32
DISPLAY_PREFIX_CHARS = len(KEY_PREFIX) + 4
"""Characters of a key kept for display (``tpq-AbCd``): a hint which key it is, useless to guess it."""
NO_KEYS_TTL_S = 1.0
"""Seconds the gateway remembers that no key exists before it asks Redis again."""
MAX_NAME_CHARS = 64
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[str, ...] = ("interactive", "batch")

# KEYS[1]: the names hash, KEYS[2]: the new key's record. ARGV[1]: name, ARGV[2]: key id, ARGV[3..]: the
# record's field/value pairs. Refuses (0) a name that is taken; else writes both (1).
_CREATE_SCRIPT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
return 1
"""
# KEYS[1]: the names hash, KEYS[2]: the key's record, KEYS[3]: its rate-limit buckets. ARGV[1]: name,
# ARGV[2]: the key id the caller read for it. Nothing happens (0) if the name no longer maps to that id.
_REVOKE_SCRIPT = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
return 1
"""


@dataclass(frozen=True)
class ApiKey:
    """One API key's record: never the key itself, only its id (SHA-256 hex digest) and a display prefix."""

    key_id: str
    name: str
    prefix: str
    created: float
    rpm: int | None = None
    tpm: int | None = None
    priority: Priority = "interactive"

    @property
    def limited(self) -> bool:
        """Whether the key has a requests- or tokens-per-minute limit."""
        return self.rpm is not None or self.tpm is not None

    def fields(self) -> dict[str, str]:
        """The record as Redis hash fields (an unset limit is an empty string)."""
        return {"name": self.name, "prefix": self.prefix, "created": repr(self.created),
                "rpm": "" if self.rpm is None else str(self.rpm), "tpm": "" if self.tpm is None else str(self.tpm),
                "priority": self.priority}

    @classmethod
    def from_fields(cls, key_id: str, fields: Mapping[Any, Any]) -> ApiKey:
        """The record read back from its hash (bytes or str)."""
        text = {as_text(k): as_text(v) for k, v in fields.items()}
        priority = text.get("priority", "interactive")
        return cls(key_id=key_id, name=text["name"], prefix=text.get("prefix", ""),
                   created=float(text.get("created") or 0), rpm=_optional_int(text.get("rpm")),
                   tpm=_optional_int(text.get("tpm")), priority="batch" if priority == "batch" else "interactive")


def _optional_int(value: str | None) -> int | None:
    return int(value) if value else None


def new_key() -> str:
    """A fresh API key: ``tpq-`` and 32 random URL-safe bytes."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def key_id_of(key: str) -> str:
    """The id Redis knows a key by: its SHA-256 hex digest."""
    return hashlib.sha256(key.encode()).hexdigest()


def validate_name(name: str) -> str:
    """Return ``name`` if usable for a key (1 to 64 of ``[A-Za-z0-9_.-]``, first a letter or digit), else raise."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS or not _NAME_RE.fullmatch(name):
        raise InvalidRequestError(f"invalid key name {name!r}: use 1 to {MAX_NAME_CHARS} letters, digits, '_', '.' "
                                  "and '-', starting with a letter or digit")
    return name


def _validate_limit(what: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidRequestError(f"{what} must be a whole number of at least 1 (leave it out for no limit), "
                                  f"got {value!r}")
    return value


# ---------------------------------------------------------------- the key store (synchronous: `tpq keys`)


def create_key(conn: redis.Redis, name: str, *, rpm: int | None = None, tpm: int | None = None,
               priority: str = "interactive") -> tuple[str, ApiKey]:
    """Make a key called ``name``: ``(the key, its record)``. The key is not stored; it cannot be shown again.

    Raises :class:`InvalidRequestError` for a bad name, limit or priority,
    or a name another key has (revoke that one first).
    """
    validate_name(name)
    _validate_limit("rpm", rpm)
    _validate_limit("tpm", tpm)
    if priority not in PRIORITIES:
        raise InvalidRequestError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    key = new_key()
    record = ApiKey(key_id=key_id_of(key), name=name, prefix=key[:DISPLAY_PREFIX_CHARS], created=time.time(),
                    rpm=rpm, tpm=tpm, priority=cast(Priority, priority))
    pairs = [part for item in record.fields().items() for part in item]
    created = conn.register_script(_CREATE_SCRIPT)(keys=[keys.api_key_names(), keys.api_key(record.key_id)],
                                                   args=[name, record.key_id, *pairs])
    if not int(created):
        raise InvalidRequestError(f"a key named {name!r} exists already; choose another name, or revoke it first "
                                  f"(tpq keys revoke {name})")
    return key, record


def list_keys(conn: redis.Redis) -> list[ApiKey]:
    """Every key's record, by name."""
    ids = {as_text(name): as_text(key_id) for name, key_id in conn.hgetall(keys.api_key_names()).items()}
    pipe = conn.pipeline(transaction=False)
    for key_id in ids.values():
        pipe.hgetall(keys.api_key(key_id))
    records = [ApiKey.from_fields(key_id, fields) for key_id, fields in zip(ids.values(), pipe.execute()) if fields]
    return sorted(records, key=lambda record: record.name)


def revoke_key(conn: redis.Redis, name: str) -> ApiKey:
    """Delete the key called ``name`` (its record and rate-limit state); its record as it was.

    Raises :class:`InvalidRequestError` if there is no such key.
    """
    key_id = conn.hget(keys.api_key_names(), validate_name(name))
    fields = conn.hgetall(keys.api_key(as_text(key_id))) if key_id is not None else {}
    revoked = key_id is not None and int(conn.register_script(_REVOKE_SCRIPT)(
        keys=[keys.api_key_names(), keys.api_key(as_text(key_id)), keys.rate_limit(as_text(key_id))],
        args=[name, as_text(key_id)]))
    if not revoked:
        raise InvalidRequestError(f"no key named {name!r} (tpq keys list shows them)")
    return ApiKey.from_fields(as_text(key_id), fields or {"name": name})


def any_keys(conn: redis.Redis) -> bool:
    """Whether at least one key exists."""
    return bool(conn.exists(keys.api_key_names()))


# ---------------------------------------------------------------- the gateway's check


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def unauthorized(message: str) -> APIError:
    """A 401 in OpenAI's shape (``invalid_api_key``), which the SDK raises as ``AuthenticationError``."""
    return APIError(401, message, code="invalid_api_key", type_="invalid_request_error",
                    headers={"WWW-Authenticate": "Bearer"})


def _shown(token: str) -> str:
    return f"{token[:DISPLAY_PREFIX_CHARS]}***" if len(token) > DISPLAY_PREFIX_CHARS + 4 else "***"


class KeyDirectory:
    """Finds the key of a request on the gateway's asyncio Redis, remembering "no key exists" for a second."""

    def __init__(self, conn: redis.asyncio.Redis, *, require_keys: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.conn, self.require_keys, self.clock = conn, require_keys, clock
        self._open_until = float("-inf")

    async def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The request's key; None while no key exists (open); :class:`APIError` 401 for a key it needs."""
        if not self.require_keys and self.clock() < self._open_until:
            return None
        token = bearer_token(authorization)
        pipe = self.conn.pipeline(transaction=False)
        pipe.exists(keys.api_key_names())
        if token is not None:
            pipe.hgetall(keys.api_key(key_id_of(token)))
        exists, *found = await pipe.execute()
        if not exists:
            if self.require_keys:
                raise unauthorized("this gateway listens on a public address and no API key exists yet: create "
                                   "one (tpq keys create NAME) and send it as Authorization: Bearer <key>")
            self._open_until = self.clock() + NO_KEYS_TTL_S
            return None
        if token is None:
            raise unauthorized("you didn't provide an API key: send it in the Authorization header as "
                               "'Authorization: Bearer <key>' (tpq keys create NAME makes one)")
        if not found[0]:
            raise unauthorized(f"incorrect API key provided: {_shown(token)}; it is unknown or was revoked "
                               "(tpq keys list shows the keys)")
        return ApiKey.from_fields(key_id_of(token), found[0])


def guarded(path: str) -> bool:
    """Whether ``path`` needs a key once keys exist: every ``/v1`` route."""
    return path == "/v1" or path.startswith("/v1/")


def service_unavailable(error: Exception) -> APIError:
    """The 503 of a key check that could not reach Redis."""
    return APIError(503, f"cannot check the API key: Redis is unreachable ({type(error).__name__}: {error})",
                    code="redis_unavailable")


AUTH_ERRORS: tuple[type[Exception], ...] = (TpqError, redis.exceptions.RedisError, OSError)
"""What a key check or rate-limit call may raise when Redis is unreachable."""


class KeyGuard:
    """ASGI middleware: the key check of every ``/v1`` request, and the requests limit of the HTTP ones.

    A WebSocket's handshake is checked for its key but not charged: each
    request it carries is (:mod:`producer.gateway.websocket`). It leaves a
    :class:`~producer.gateway.ratelimit.KeyContext` in the
    scope's ``state`` (the routes read the key's priority and tokens limit
    from it) and adds the ``x-ratelimit-*`` headers of the latest verdict to
    the response. Its Redis is the gateway client's asyncio connection.
    """

    def __init__(self, app: Any, require_keys: bool = False) -> None:
        self.app, self.require_keys = app, require_keys
        self._services: tuple[KeyDirectory, RateLimiter] | None = None

    def services(self, scope: dict) -> tuple[KeyDirectory, RateLimiter]:
        """The key directory and limiter, made on first use (the connection exists once the app started)."""
        if self._services is None:
            conn = scope["app"].state.completions.client.redis
            self._services = (KeyDirectory(conn, require_keys=self.require_keys), RateLimiter(conn))
        return self._services

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or not guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        directory, limiter = self.services(scope)
        context = KeyContext(None, limiter)
        send = _with_limit_headers(send, context)
        try:
            context.key = await directory.authenticate(Headers(scope=scope).get("authorization"))
            if context.key is not None and context.key.limited and scope["type"] == "http":
                verdict = await context.take(requests=1 if context.key.rpm else 0)
                if verdict.refused is not None:
                    raise refusal(verdict, context.key, 1)
        except APIError as error:
            await _refuse(scope, receive, send, error)
            return
        except AUTH_ERRORS as error:
            await _refuse(scope, receive, send, service_unavailable(error))
            return
        scope.setdefault("state", {})[STATE_KEY] = context
        await self.app(scope, receive, send)


def _with_limit_headers(send: Any, context: KeyContext) -> Any:
    async def sending(message: dict) -> None:
        if message["type"] == "http.response.start" and context.verdict is not None:
            extra = [(name.encode(), value.encode()) for name, value in context.verdict.headers().items()]
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return sending


async def _refuse(scope: dict, receive: Any, send: Any, error: APIError) -> None:
    if scope["type"] == "websocket":  # refused before the handshake: close with "policy violation"
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008, "reason": error.message[:120]})
        return
    await JSONResponse(error.body(), status_code=error.status, headers=error.headers)(scope, receive, send)


def install(app: Any, settings: Settings) -> None:
    """Guard ``app``'s ``/v1`` routes with API keys; keys are required even before one exists on a public
    address the gateway was not told to serve anonymously (``http_host``, ``http_allow_anonymous``)."""
    require = not is_loopback(settings.http_host) and not settings.http_allow_anonymous
    app.add_middleware(KeyGuard, require_keys=require)
