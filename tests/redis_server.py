"""The test fixtures' redis-server: :mod:`common.embedded_redis`, the one ``tpq up`` runs too."""
from common.embedded_redis import DEFAULT_PORT, RedisServer, RedisServerError, find_redis_server, free_port

__all__ = ["DEFAULT_PORT", "RedisServer", "RedisServerError", "find_redis_server", "free_port"]
