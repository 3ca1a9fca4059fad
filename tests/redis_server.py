"""The test fixtures' redis-server: :mod:`producer.local_stack.embedded_redis`, the one ``tpq up`` runs too."""
from producer.local_stack.embedded_redis import DEFAULT_PORT, RedisServer, RedisServerError, find_redis_server, free_port

__all__ = ["DEFAULT_PORT", "RedisServer", "RedisServerError", "find_redis_server", "free_port"]
