"""A data store that is down or hung: which errors mean it, and the JSON 503 with ``Retry-After`` that answers them.

Only connection-level failures qualify — the database unreachable, out of connections, its pool timed out, a
transaction the server cancelled to be retried (``OperationalError``, ``InterfaceError``), Redis unreachable or
hung with no fallback left (``redis.ConnectionError``, ``redis.TimeoutError``, django-redis'
``ConnectionInterrupted``). ``IntegrityError`` and ``DataError`` are not among them: those are bugs or bad input.

The lowest app of the stack owns this, so the tenant middleware, the quota enforcement points and the API all
answer alike.
"""

from __future__ import annotations

import logging

from django.db import InterfaceError, OperationalError
from django.http import JsonResponse

logger = logging.getLogger("tenants.unavailable")

RETRY_AFTER_SECONDS = 5  # the Redis breaker's default cool-down and the example project's database pool timeout
CODE = "service_unavailable"
MESSAGE = "a data store is unavailable; retry later"


def _store_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OperationalError, InterfaceError]
    try:  # raw driver errors, should one escape Django's wrapping (e.g. from a raw connection attribute)
        import psycopg

        errors += [psycopg.OperationalError, psycopg.InterfaceError]
    except ImportError:  # pragma: no cover (psycopg is a dependency)
        pass
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        errors += [RedisConnectionError, RedisTimeoutError]
    except ImportError:  # pragma: no cover (django-redis depends on redis)
        pass
    try:
        from django_redis.exceptions import ConnectionInterrupted

        errors.append(ConnectionInterrupted)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


STORE_ERRORS: tuple[type[BaseException], ...] = _store_errors()


def is_store_unavailable(error: BaseException) -> bool:
    """``error`` says a database or Redis is down, hung or out of connections (not a bug, not bad input)."""
    return isinstance(error, STORE_ERRORS)


def log_unavailable(error: BaseException, where: str) -> None:
    """One WARNING naming the exception's type and where it surfaced: never its text (it may name hosts, users)."""
    code = getattr(getattr(error, "__cause__", None), "sqlstate", None) or getattr(error, "sqlstate", None)
    logger.warning(
        "store unavailable in %s: %s%s; answered 503",
        where,
        type(error).__name__,
        f" (SQLSTATE {code})" if code else "",
    )


def unavailable_body() -> dict[str, dict[str, str | None]]:
    """The 503's JSON body, the same shape as every other error."""
    return {"error": {"code": CODE, "field": None, "message": MESSAGE}}


def unavailable_response(error: BaseException, where: str) -> JsonResponse:
    """Log ``error`` and answer 503 JSON with ``Retry-After``."""
    log_unavailable(error, where)
    response = JsonResponse(unavailable_body(), status=503)
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response
