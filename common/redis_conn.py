"""The one place tpqueue opens Redis connections.

Accepted URL forms (credentials optional, percent-encode special characters):

- ``redis://[[user]:password@]host[:port][/db][?option=value&...]``
- ``rediss://[[user]:password@]host[:port][/db][?ssl_ca_certs=/path&...]`` (TLS)
- ``unix://[[user]:password@]/absolute/path/redis.sock[?db=N&...]``

Clients retry commands that fail with a connection error or a timeout, with
exponential back-off, so a Redis restart costs a short stall rather than a
crash. Log and print URLs only through :func:`redact_url`: a password must
never reach a log.
"""
from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import ExponentialBackoff
from redis.connection import parse_url as _redis_parse_url
from redis.exceptions import AuthenticationError, AuthorizationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig
from redis.retry import Retry

from common.errors import InvalidConfigError, TpqError

SCHEMES = ("redis", "rediss", "unix")
ACCEPTED_FORMS = (
    "redis://[[user]:password@]host[:port][/db], "
    "rediss://[[user]:password@]host[:port][/db][?ssl_ca_certs=...] (TLS), "
    "unix://[[user]:password@]/path/to/redis.sock[?db=N]"
)

DEFAULT_RETRIES = 6
DEFAULT_BACKOFF_BASE_S = 0.05
DEFAULT_BACKOFF_CAP_S = 2.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_HEALTH_CHECK_INTERVAL_S = 30

_COMMON_OPTIONS = frozenset({
    "db", "username", "password", "socket_timeout", "socket_connect_timeout",
    "socket_keepalive", "health_check_interval", "client_name", "protocol",
    "max_connections",
})
_TLS_OPTIONS = frozenset({
    "ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
    "ssl_check_hostname", "ssl_password", "ssl_min_version", "ssl_ciphers",
})
_CERT_REQS = ("none", "optional", "required")
_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://)?(?P<userinfo>.*)@", re.DOTALL)
_SECRET_QUERY = re.compile(r"(?P<name>[?&][^=&#]*(?:pass|secret|token)[^=&#]*=)(?P<value>[^&#]*)", re.IGNORECASE)
_RETRY_ERRORS = (RedisConnectionError, RedisTimeoutError, socket.timeout, ConnectionError)
# Subclasses of ConnectionError that waiting cannot fix: fail at once.
_NEVER_RETRY = (AuthenticationError, AuthorizationError)


class RedisUnavailableError(TpqError, ConnectionError):
    """Redis could not be reached (or refused the credentials) when tpqueue needed it."""


def _retryable(error: Exception, is_retryable: Any) -> bool:
    return not isinstance(error, _NEVER_RETRY) and (is_retryable is None or is_retryable(error))


class _Retry(Retry):
    """redis-py's Retry, except that a rejected password or ACL is raised at once."""

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):  # type: ignore[no-untyped-def]
        return super().call_with_retry(do, fail, lambda e: _retryable(e, is_retryable), with_failure_count)


class _AsyncRetry(redis.asyncio.retry.Retry):
    """The asyncio twin of :class:`_Retry`."""

    async def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):  # type: ignore[no-untyped-def]
        return await super().call_with_retry(do, fail, lambda e: _retryable(e, is_retryable), with_failure_count)


class _TlsConnection(redis.SSLConnection):
    """redis-py's TLS connection with the handshake bounded by the connect timeout, not the command timeout.

    tpqueue leaves the command timeout unbounded (blocking reads), and
    redis-py runs the handshake under it: a ``rediss://`` URL that points
    at a plain-text port then hung forever instead of failing.
    """

    def _wrap_socket_with_ssl(self, sock):  # type: ignore[no-untyped-def]
        sock.settimeout(self.socket_connect_timeout)
        wrapped = super()._wrap_socket_with_ssl(sock)
        wrapped.settimeout(self.socket_timeout)
        return wrapped


def redact_url(url: str) -> str:
    """``url`` with every password replaced by ``***``; safe to log.

    Redacts the password of the user-info part (``user:***@``; a lone
    ``:password@`` becomes ``:***@``) and the value of any query option whose
    name contains ``pass``, ``secret`` or ``token``. Works on malformed URLs
    too, erring towards hiding more: everything up to the last ``@`` counts as
    user info, and without a ``scheme://`` the whole user info is hidden.
    """
    text = _SECRET_QUERY.sub(lambda m: f"{m['name']}***", str(url))
    match = _USERINFO.match(text)
    if not match:
        return text
    head, userinfo = match["head"] or "", match["userinfo"]
    user, sep, _password = userinfo.partition(":")
    if not head or "@" in user:
        redacted = "***"
    elif sep:
        redacted = f"{user}:***"
    else:
        redacted = userinfo  # a user name alone, no password
    return f"{head}{redacted}@{text[match.end():]}"


def parse_redis_url(url: str) -> dict[str, Any]:
    """Check ``url`` and return the keyword arguments redis-py's connection pool takes for it.

    Raises :class:`InvalidConfigError` (showing the redacted URL and the
    accepted forms) for an unsupported scheme, a missing host or socket
    path, a bad port or db, or an unknown query option.
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidConfigError(f"Redis URL must be a non-empty string; accepted forms: {ACCEPTED_FORMS}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise _bad_url(url, str(e)) from None
    if "://" not in url:
        raise _bad_url(url, "it has no scheme://")
    if parts.scheme not in SCHEMES:
        raise _bad_url(url, f"unsupported scheme {parts.scheme + '://'}")
    if parts.fragment:
        raise _bad_url(url, "a '#fragment' has no meaning in a Redis URL")
    if parts.scheme == "unix":
        if parts.hostname or port is not None or not parts.path.startswith("/"):
            raise _bad_url(
                url, "unix:// needs an absolute socket path and no host, e.g. unix:///run/redis/redis.sock"
            )
    else:
        if not parts.hostname:
            raise _bad_url(url, f"{parts.scheme}:// needs a host, e.g. {parts.scheme}://localhost:6379/0")
        if port == 0:
            raise _bad_url(url, "port 0 is not a usable Redis port")
        db_path = parts.path.strip("/")
        if db_path and not (db_path.isascii() and db_path.isdigit()):
            raise _bad_url(url, f"the path must be a db number, got {'/' + db_path!r}")
    _check_query(url, parts.scheme, parts.query)
    try:
        kwargs = _redis_parse_url(url)
    except ValueError as e:
        raise _bad_url(url, str(e)) from None
    if kwargs.get("db", 0) < 0:
        raise _bad_url(url, "the db number must be >= 0")
    return kwargs


def _check_query(url: str, scheme: str, query: str) -> None:
    allowed = _COMMON_OPTIONS | (_TLS_OPTIONS if scheme == "rediss" else frozenset())
    try:
        options = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise _bad_url(url, "the query string is malformed") from None
    for name, values in options.items():
        if name in _TLS_OPTIONS and scheme != "rediss":
            raise _bad_url(url, f"option {name!r} needs TLS: use rediss://")
        if name not in allowed:
            raise _bad_url(url, f"unknown option {name!r}; known options: {', '.join(sorted(allowed))}")
        if len(values) > 1:
            raise _bad_url(url, f"option {name!r} is given {len(values)} times")
        if name == "ssl_cert_reqs" and values[0] not in _CERT_REQS:
            raise _bad_url(url, f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}")


def _bad_url(url: str, why: str) -> InvalidConfigError:
    why = why.rstrip(".")
    return InvalidConfigError(f"bad Redis URL {redact_url(url)!r}: {why}. Accepted forms: {ACCEPTED_FORMS}")


@dataclass(frozen=True)
class ConnectOptions:
    """How a tpqueue Redis client connects and retries: the keyword arguments of :func:`connect`."""

    decode_responses: bool = False
    socket_timeout: float | None = None
    socket_connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT_S
    health_check_interval: int = DEFAULT_HEALTH_CHECK_INTERVAL_S
    client_name: str | None = None
    retries: int = DEFAULT_RETRIES
    backoff_base_s: float = DEFAULT_BACKOFF_BASE_S
    backoff_cap_s: float = DEFAULT_BACKOFF_CAP_S
    max_connections: int | None = None  # None: a connection per concurrent command; else they wait for one

    def __post_init__(self) -> None:
        if self.max_connections is not None and self.max_connections < 1:
            raise InvalidConfigError(f"max_connections must be >= 1 or None, got {self.max_connections}")
        if self.retries < 0:
            raise InvalidConfigError(f"retries must be >= 0, got {self.retries}")
        if not (0 < self.backoff_base_s <= self.backoff_cap_s):
            raise InvalidConfigError(
                f"need 0 < backoff_base_s <= backoff_cap_s, got base {self.backoff_base_s} and cap {self.backoff_cap_s}"
            )

    @property
    def backoff(self) -> ExponentialBackoff:
        return ExponentialBackoff(cap=self.backoff_cap_s, base=self.backoff_base_s)

    def client_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of redis-py's ``Redis.from_url`` (sync or asyncio) but ``retry``."""
        kwargs: dict[str, Any] = {
            "decode_responses": self.decode_responses,
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_connect_timeout,
            "health_check_interval": self.health_check_interval,
            "retry_on_timeout": True,
            # No CLIENT SETINFO, no CLIENT MAINT_NOTIFICATIONS (for managed clusters' failovers): the connection
            # handshake then needs only AUTH/HELLO and CLIENT SETNAME, which a tight Redis ACL allows (README "Security").
            "driver_info": None,
            "maint_notifications_config": MaintNotificationsConfig(enabled=False),
        }
        if self.client_name is not None:
            kwargs["client_name"] = self.client_name
        return kwargs


def retries_for(outage_s: float, backoff_base_s: float = DEFAULT_BACKOFF_BASE_S,
                backoff_cap_s: float = DEFAULT_BACKOFF_CAP_S) -> int:
    """The ``retries`` of :func:`connect` whose back-off waits out an outage of ``outage_s`` seconds.

    The default (:data:`DEFAULT_RETRIES`) covers about 5 s: a blip. A Redis
    restart that reloads a large AOF ("Redis is loading the dataset in
    memory") takes longer, and a process that can wait for it should.
    """
    retries, waited = 0, 0.0
    while waited < outage_s:
        retries += 1
        waited += min(backoff_cap_s, backoff_base_s * 2 ** retries)
    return retries


def connect(url: str, *, check: bool = False, **options: Any) -> redis.Redis:
    """A Redis client for ``url`` that retries connection errors and timeouts.

    ``options`` are the fields of :class:`ConnectOptions`. A command failing
    with a connection error or a timeout (including "Redis is loading its
    AOF") is retried up to ``retries`` times with exponential back-off
    (``2 * backoff_base_s`` doubling up to ``backoff_cap_s``: about 5 s in all
    with the defaults), on a fresh connection each time; a rejected password
    is raised at once. ``socket_timeout=None`` lets blocking commands (BLPOP,
    XREAD BLOCK) wait as long as they ask. ``client_name`` shows in CLIENT
    LIST. The client connects lazily; ``check=True`` PINGs now and raises
    :class:`RedisUnavailableError` if Redis cannot be reached. Raises
    :class:`InvalidConfigError` for a malformed URL.
    """
    parse_redis_url(url)
    opts = ConnectOptions(**options)
    retry = _Retry(opts.backoff, opts.retries, _RETRY_ERRORS)
    if opts.max_connections is None:
        client = redis.Redis.from_url(url, retry=retry, **opts.client_kwargs())
    else:  # a bounded pool: a command waits for a free connection (timeout None: as long as it takes)
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=opts.max_connections, timeout=None,
                                                     retry=retry, **opts.client_kwargs())
        client = redis.Redis(connection_pool=pool, retry=retry)
    if client.connection_pool.connection_class is redis.SSLConnection:
        client.connection_pool.connection_class = _TlsConnection
    if check:
        try:
            client.ping()
        except redis.RedisError as e:
            client.close()
            raise _unavailable(url, e) from None
    return client


def async_connect(url: str, **options: Any) -> redis.asyncio.Redis:
    """The asyncio twin of :func:`connect` (same URL forms, :class:`ConnectOptions`, retries and errors).

    A plain function: building the client does no I/O; it connects on its
    first command. Close it with ``await client.aclose()``.
    """
    parse_redis_url(url)
    opts = ConnectOptions(**options)
    retry = _AsyncRetry(opts.backoff, opts.retries, _RETRY_ERRORS)
    if opts.max_connections is None:
        return redis.asyncio.Redis.from_url(url, retry=retry, **opts.client_kwargs())
    pool = redis.asyncio.BlockingConnectionPool.from_url(url, max_connections=opts.max_connections, timeout=None,
                                                         retry=retry, **opts.client_kwargs())
    return redis.asyncio.Redis.from_pool(pool)


def _unavailable(url: str, error: Exception) -> RedisUnavailableError:
    return RedisUnavailableError(
        f"cannot use Redis at {redact_url(url)}: {type(error).__name__}: {redact_url(str(error))}. "
        "Check that redis-server runs there and that TPQ_REDIS_URL (host, port, password, TLS) is right."
    )
