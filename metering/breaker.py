"""A circuit breaker on the Redis connections of the process: a hung or unreachable Redis costs one timeout per
cool-down, not one per call.

Install it at the connection level, so it covers every use of that Redis — the Django cache API (lineage and rules
caches), the usage counters and the rules tokens (``django_redis.get_redis_connection``) — without any caller
knowing::

    CACHES = {"default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "OPTIONS": {
            "SOCKET_CONNECT_TIMEOUT": 0.5,
            "SOCKET_TIMEOUT": 0.5,
            "CONNECTION_POOL_CLASS": "metering.breaker.BreakerConnectionPool",
            "CONNECTION_POOL_KWARGS": {"breaker_cooldown": 5.0},  # optional: 5 s is the default
        },
    }}

After a connection error or a timeout on any connection to a server (one breaker per ``host:port`` in the
process), every call to that server fails at once with ``RedisUnavailable`` — a ``redis.ConnectionError``, so
every existing fallback applies: the quota decision takes the exact database path, a cache read is a miss — until
``breaker_cooldown`` seconds have passed; then one call (the first thread to ask) probes the server, and its
success closes the breaker for everyone, its failure opens it for another cool-down.

Why not pybreaker: its ``CircuitBreaker.call`` runs the protected function while holding the breaker's lock
(serializing every Redis call of the process), it wraps one function call whereas a Redis command is a
``send`` and a later ``read`` on a connection, and it raises its own ``CircuitBreakerError``, which the Redis
fallbacks would not recognize. The state here is three numbers behind a lock held for microseconds.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from redis.connection import Connection, ConnectionPool, SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger("metering.breaker")

DEFAULT_COOLDOWN_SECONDS = 5.0
FAILURES = (RedisConnectionError, RedisTimeoutError)


class RedisUnavailable(RedisConnectionError):
    """Raised without touching the network while the breaker of a Redis server is open. ``reported``: the breaker
    logged the failure that opened it, so callers falling back need not log each call again (``log_level``)."""

    reported = True


class CircuitBreaker:
    """Closed (calls go through), open (calls fail at once) or probing (one thread's calls go through).

    Thread-safe; ``clock`` is injectable for tests. A single failure opens it: one timeout is the cost we bound.
    """

    def __init__(self, name: str, cooldown: float = DEFAULT_COOLDOWN_SECONDS, clock: Any = time.monotonic) -> None:
        if not cooldown > 0:
            raise ValueError(f"breaker_cooldown must be a positive number of seconds, got {cooldown!r}")
        self.name = name
        self.cooldown = float(cooldown)
        self.clock = clock
        self._lock = threading.Lock()
        self._opened_at: float | None = None  # None: closed
        self._prober: int | None = None  # the thread whose calls probe the server after a cool-down
        self.trips = 0  # times it opened (a closed breaker that fails again counts again)

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def before_call(self) -> None:
        """Let the call through, or raise ``RedisUnavailable`` while open and not this thread's turn to probe."""
        if self._opened_at is None:  # the hot path: no lock while closed (a stale read costs one call at most)
            return
        with self._lock:
            opened_at = self._opened_at
            if opened_at is None:
                return
            me = threading.get_ident()
            if self._prober == me:
                return  # the probe's own nested calls (connect, then the handshake, then the command)
            now = self.clock()
            waited = now - opened_at
            if waited >= self.cooldown:
                # This thread probes; the others keep failing fast for another cool-down, should the probe hang.
                self._prober = me
                self._opened_at = now
                return
        raise RedisUnavailable(
            f"redis {self.name} is unavailable (circuit open for {self.cooldown - waited:.1f} s more)"
        )

    def record_success(self) -> None:
        """The server answered: close."""
        if self._opened_at is None and self._prober is None:
            return
        with self._lock:
            was_open = self._opened_at is not None
            self._opened_at = None
            self._prober = None
        if was_open:
            logger.warning("redis %s answers again: circuit closed", self.name)

    def record_failure(self, error: BaseException) -> None:
        """A connection error or timeout: open (again) for a cool-down."""
        with self._lock:
            was_closed = self._opened_at is None
            self._opened_at = self.clock()
            self._prober = None
            if was_closed:
                self.trips += 1
        if was_closed:
            logger.warning(
                "redis %s failed (%s): circuit open, calls fail fast for %.1f s",
                self.name,
                type(error).__name__,
                self.cooldown,
            )

    def reset(self) -> None:
        """Closed, as new (tests)."""
        with self._lock:
            self._opened_at = None
            self._prober = None


_breakers: dict[tuple[str, float], CircuitBreaker] = {}
_registry_lock = threading.Lock()


def log_level(error: BaseException) -> int:
    """WARNING for a Redis failure, DEBUG for a call refused by an open breaker (already reported once)."""
    return logging.DEBUG if getattr(error, "reported", False) else logging.WARNING


def breaker_for(host: str, port: int | str, cooldown: float = DEFAULT_COOLDOWN_SECONDS) -> CircuitBreaker:
    """The process's breaker of the server at ``host:port`` (shared by every pool and connection to it)."""
    name = f"{host}:{port}"
    key = (name, float(cooldown))
    breaker = _breakers.get(key)
    if breaker is None:
        with _registry_lock:
            breaker = _breakers.setdefault(key, CircuitBreaker(name, cooldown))
    return breaker


def reset_all() -> None:
    """Close every breaker of the process (tests, or after an operator fixed Redis and wants no wait)."""
    for breaker in list(_breakers.values()):
        breaker.reset()


class BreakerMixin:
    """Checks and trips the server's breaker around a redis-py connection's connect, send and read."""

    breaker: CircuitBreaker

    def __init__(self, *args: Any, breaker_cooldown: float = DEFAULT_COOLDOWN_SECONDS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.breaker = breaker_for(self.host, self.port, breaker_cooldown)  # type: ignore[attr-defined]

    def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        if self._sock is not None:  # type: ignore[attr-defined]
            return
        self.breaker.before_call()
        try:
            super().connect_check_health(*args, **kwargs)  # type: ignore[misc]
        except FAILURES as error:
            self.breaker.record_failure(error)
            raise

    def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        self.breaker.before_call()
        try:
            super().send_packed_command(*args, **kwargs)  # type: ignore[misc]
        except FAILURES as error:
            self.breaker.record_failure(error)
            raise

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        # No check before reading: the command is on the wire, and its answer (or its timeout) is what we learn from.
        try:
            response = super().read_response(*args, **kwargs)  # type: ignore[misc]
        except ResponseError:
            self.breaker.record_success()  # the server answered, with an error of the command
            raise
        except FAILURES as error:
            self.breaker.record_failure(error)
            raise
        self.breaker.record_success()
        return response


class BreakerConnection(BreakerMixin, Connection):
    """``redis.connection.Connection`` behind the process's breaker of its server."""


class BreakerSSLConnection(BreakerMixin, SSLConnection):
    """``redis.connection.SSLConnection`` (``rediss://``) behind the process's breaker of its server."""


_BEHIND_BREAKER: dict[type[Connection], type[Connection]] = {
    Connection: BreakerConnection,
    SSLConnection: BreakerSSLConnection,
}


class BreakerConnectionPool(ConnectionPool):
    """A ``redis.ConnectionPool`` whose connections (``redis://`` or ``rediss://``) are behind the breaker.

    Named by a dotted path (django-redis ``OPTIONS["CONNECTION_POOL_CLASS"]``), so settings import nothing.
    ``breaker_cooldown`` (seconds, default 5) is how long calls fail fast before one probes.
    """

    def __init__(self, connection_class: type[Any] = Connection, **kwargs: Any) -> None:
        connection_class = _BEHIND_BREAKER.get(connection_class, connection_class)
        if not issubclass(connection_class, BreakerMixin):
            raise TypeError(f"BreakerConnectionPool cannot put {connection_class.__name__} behind its breaker")
        super().__init__(connection_class=connection_class, **kwargs)
