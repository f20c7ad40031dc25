"""Which real services are reachable. Used by conftest (skip, or fail under CI=true) and by ``make test``."""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlparse

DEFAULT_URLS = {
    "postgres": "postgres://postgres@127.0.0.1:5432/postgres",
    "redis": "redis://127.0.0.1:6379/15",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
}
ENV = {"postgres": "DATABASE_URL", "redis": "REDIS_URL", "rabbitmq": "CELERY_BROKER_URL"}


def url(service: str) -> str:
    # TEST_REDIS_URL (etc.) wins: parallel runs of the embedded suite, which unsets REDIS_URL, keep apart.
    configured = os.environ.get("TEST_" + ENV[service], "") or os.environ.get(ENV[service], "")
    scheme = urlparse(configured).scheme
    if configured and (service != "postgres" or scheme.startswith("postgres")):
        return configured
    return DEFAULT_URLS[service]


def reachable(service: str, timeout: float = 1.0) -> bool:
    parsed = urlparse(url(service))
    host, port = parsed.hostname or "127.0.0.1", parsed.port
    try:
        with socket.create_connection((host, port or 0), timeout=timeout):
            return True
    except OSError:
        return False


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


if __name__ == "__main__":
    # `python -m tests.services postgres redis`: exit 0 when all are up, 1 when one is down.
    missing = [name for name in sys.argv[1:] if not reachable(name)]
    for name in missing:
        print(f"{name} is unreachable at {url(name)}", file=sys.stderr)
    sys.exit(1 if missing else 0)
