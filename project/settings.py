"""Settings of the example project, from the environment.

Nothing set: SQLite in ``var/``, the local-memory cache and eager Celery, so the first command works anywhere.
``DATABASE_URL`` (postgres://...), ``REDIS_URL`` and ``CELERY_BROKER_URL`` switch to the real services.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from quotas.schedule import beat_schedule

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("VAR_DIR", BASE_DIR / "var"))

DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
# A development key only while DEBUG is on: with DEBUG off the project refuses to start without its own key (a known
# key lets anyone forge sessions, password resets and signed cookies). The "django-insecure-" prefix makes
# `check --deploy` flag it too (security.W009).
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set and DJANGO_DEBUG is 0: set DJANGO_SECRET_KEY to a long random value, e.g. "
            "`python -c 'import secrets; print(secrets.token_urlsafe(50))'`"
        )
    SECRET_KEY = "django-insecure-example-project-development-only-0123456789abcdef"  # noqa: S105
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI assets served locally
    "tenants",
    "metering",
    "quotas",
    "project",  # the example project: seed_demo and its templates (never in the wheel)
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "tenants.middleware.TenantMiddleware",
    "quotas.middleware.QuotaMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"
ASGI_APPLICATION = "project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database() -> dict[str, Any]:
    url = os.environ.get("DATABASE_URL")
    if url:
        return _postgresql(url)
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": VAR_DIR / "db.sqlite3",
        # IMMEDIATE transactions serialize writers, so concurrent usage is exact on SQLite too.
        "OPTIONS": {
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
            "init_command": "PRAGMA journal_mode=WAL;",
        },
        "TEST": {"NAME": str(VAR_DIR / "test.sqlite3")},
    }


def _postgresql(url: str) -> dict[str, Any]:
    """psycopg's connection pool, bounded, instead of persistent connections (CONN_MAX_AGE).

    With CONN_MAX_AGE each server thread keeps its own connection, and a thread that dies (or a burst of threads)
    leaves connections the next requests cannot use. The pool hands a request a connection that was just checked
    (CONN_HEALTH_CHECKS: one empty query at checkout, as Django's own health check costs), discards dead ones, so
    requests succeed again as soon as PostgreSQL is back, and bounds every wait: a request waits at most
    DATABASE_POOL_TIMEOUT seconds for a connection (then 503), a connection attempt at most connect_timeout.
    Size DATABASE_POOL_MAX_SIZE to the threads of one server process (each request holds one connection).
    """
    database = dict(dj_database_url.parse(url, conn_max_age=0, conn_health_checks=True))
    options: dict[str, Any] = dict(database.get("OPTIONS") or {})  # type: ignore[call-overload]
    options.setdefault("connect_timeout", int(os.environ.get("DATABASE_CONNECT_TIMEOUT", "3")))  # libpq: >= 2 s
    # A peer that vanishes (host down, network cut) is noticed within ~11 s even mid-query, instead of never.
    options.setdefault("keepalives", 1)
    options.setdefault("keepalives_idle", 5)
    options.setdefault("keepalives_interval", 2)
    options.setdefault("keepalives_count", 3)
    options.setdefault(
        "pool",
        {
            "min_size": int(os.environ.get("DATABASE_POOL_MIN_SIZE", "2")),
            "max_size": int(os.environ.get("DATABASE_POOL_MAX_SIZE", "16")),
            "timeout": float(os.environ.get("DATABASE_POOL_TIMEOUT", "5")),
        },
    )
    database["OPTIONS"] = options
    return database


DATABASES = {"default": _database()}


def _cache() -> dict[str, Any]:
    url = os.environ.get("REDIS_URL")
    if url:
        return {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": url,
            # Part of the site's Redis namespace (tenants.namespace): keep it stable across deploys (VERSION empties
            # caches without moving the counters), or set METERING["REDIS_NAMESPACE"].
            "KEY_PREFIX": os.environ.get("CACHE_KEY_PREFIX", "example"),
            "OPTIONS": {
                # Redis answers in well under a millisecond and our slowest command (the decision script) in a
                # few; 0.5 s is hundreds of times that, so it fires only on a fault, and it is what one hung call
                # costs before the breaker opens. redis-py's default is no timeout at all (a hung Redis, a hung
                # request).
                "SOCKET_CONNECT_TIMEOUT": float(os.environ.get("REDIS_CONNECT_TIMEOUT", "0.5")),
                "SOCKET_TIMEOUT": float(os.environ.get("REDIS_SOCKET_TIMEOUT", "0.5")),
                # After one connection error or timeout every Redis call of the process fails fast (to the exact
                # database path) for this many seconds, then one call probes (metering.breaker).
                "CONNECTION_POOL_CLASS": "metering.breaker.BreakerConnectionPool",
                "CONNECTION_POOL_KWARGS": {"breaker_cooldown": float(os.environ.get("REDIS_BREAKER_SECONDS", "5"))},
            },
        }
    return {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "xaas-example"}


CACHES = {"default": _cache()}

METERING: dict[str, Any] = {
    "ADAPTER": os.environ.get("METERING_ADAPTER", "metering.adapters.database.DatabaseMeteringAdapter"),
    "SINK_URL": os.environ.get("METERING_SINK_URL") or None,
    "BATCH_SIZE": int(os.environ.get("METERING_BATCH_SIZE", "100")),
    "API_KEY": os.environ.get("METERING_API_KEY") or None,
    "WEBHOOK_SECRET": os.environ.get("METERING_WEBHOOK_SECRET") or None,
    # Several sinks at once (comma-separated dotted paths), e.g. Lago and ClickHouse: docs/clickhouse.md.
    "SINKS": [path.strip() for path in os.environ["METERING_SINKS"].split(",") if path.strip()]
    if os.environ.get("METERING_SINKS")
    else None,
    "CLICKHOUSE_URL": os.environ.get("METERING_CLICKHOUSE_URL") or None,
    "CLICKHOUSE_DATABASE": os.environ.get("METERING_CLICKHOUSE_DATABASE") or "default",
    "CLICKHOUSE_TABLE": os.environ.get("METERING_CLICKHOUSE_TABLE") or "usage_facts",
    "CLICKHOUSE_USER": os.environ.get("METERING_CLICKHOUSE_USER") or "default",
    "CLICKHOUSE_PASSWORD": os.environ.get("METERING_CLICKHOUSE_PASSWORD") or None,
    "CLICKHOUSE_BATCH_SIZE": int(os.environ.get("METERING_CLICKHOUSE_BATCH_SIZE", "10000")),
    # request.tenant from the API key (Authorization: Bearer; seed_demo prints one); X-Tenant-ID may only narrow
    # it to a tenant of the key's subtree. No key: no tenant (401 from the demo and every quota enforcement point).
    "TENANT_RESOLVER": "tenants.resolvers.api_key_resolver",
    # "commit" (each fact committed to the database before the view runs on) or "log" (one Redis call decides,
    # counts and appends the fact to its tree's stream; metering_drain persists it): README "Write modes".
    "WRITE_MODE": os.environ.get("METERING_WRITE_MODE", "commit"),
}

# The REST API (metering.api) sets these on its own views too; here they serve any other DRF view of the project.
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["tenants.authentication.ApiKeyAuthentication"],
    "EXCEPTION_HANDLER": "metering.api.errors.exception_handler",
    "DEFAULT_PAGINATION_CLASS": "metering.api.base.ApiPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "xaas metering API",
    "DESCRIPTION": "Usage events, usage, quotas and entitlements of a tenant subtree. "
    "Authenticate with `Authorization: Bearer <API key>`; see docs/api.md.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
}

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "memory://")
CELERY_TASK_ALWAYS_EAGER = "CELERY_BROKER_URL" not in os.environ
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_RESULT_BACKEND = None
# The periodic tasks of the three apps (outbox sweep, rollup folding, log drain, reservation expiry): run one beat
# scheduler per site. A host project does the same (README "Celery in your project").
CELERY_BEAT_SCHEDULE = beat_schedule(
    sweep_seconds=float(os.environ.get("METERING_SWEEP_SECONDS", "5")),
    fold_seconds=float(os.environ.get("METERING_FOLD_SECONDS", "300")),
    drain_seconds=float(os.environ.get("METERING_DRAIN_SECONDS", "1")),
    expiry_seconds=float(os.environ.get("QUOTAS_EXPIRY_SECONDS", "30")),
)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "metering": {"handlers": ["console"], "level": os.environ.get("METERING_LOG_LEVEL", "WARNING")},
        "tenants": {"handlers": ["console"], "level": os.environ.get("METERING_LOG_LEVEL", "WARNING")},
        # With DEBUG off, Django's own console handler is silent: every 500's traceback (django.request logs it at
        # ERROR, in the API or not) still reaches the console. With DEBUG on, Django's handler prints it already.
        **({} if DEBUG else {"django.request": {"handlers": ["console"], "level": "ERROR"}}),
    },
}

# A failed CSRF check under /api/ or /demo/ answers JSON (project/errors.py); elsewhere Django's page.
CSRF_FAILURE_VIEW = "project.errors.csrf_failure"
