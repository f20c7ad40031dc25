"""The test suite's own settings (pyproject's ``DJANGO_SETTINGS_MODULE``), independent of the example project's.

Nothing set: SQLite in ``VAR_DIR`` (default ``var/``), the local-memory cache and eager Celery (the embedded
configuration). ``DATABASE_URL`` (postgres://...), ``REDIS_URL`` and ``CELERY_BROKER_URL`` switch to the real
services, exactly as for the example project; ``TEST_WRITE_MODE=log`` runs the suite in log mode (below). No other
environment variable changes a test run (the example project's ``DJANGO_*`` and ``METERING_*`` knobs do not apply
here).

Processes a test starts inherit this module (``DJANGO_SETTINGS_MODULE``), except those that are the example site
itself (gunicorn, Celery workers), which name ``project.settings``. All share the database and Redis, so what they
share with this process — ``SECRET_KEY`` (API key and fingerprint HMACs), the cache ``KEY_PREFIX`` (the Redis
namespace), the database options — has the example project's values (tests/integration/test_test_settings.py checks
they agree). The HTTP tests drive the reference site's routes
(``project.urls``: the API mounted as the docs say, the admin, the demo); tests of the example project itself
import ``project.settings`` explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dj_database_url

from quotas.schedule import beat_schedule

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("VAR_DIR", BASE_DIR / "var"))

DEBUG = True  # pytest-django runs each test with DEBUG off; this only shapes LOGGING below, as in the example
# The example sites' development key: their processes check API key and fingerprint HMACs made here.
SECRET_KEY = "django-insecure-example-project-development-only-0123456789abcdef"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
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

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],  # the example project's overrides, as in project.settings
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
        "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 30, "init_command": "PRAGMA journal_mode=WAL;"},
        "TEST": {"NAME": str(VAR_DIR / "test.sqlite3")},
    }


def _postgresql(url: str) -> dict[str, Any]:
    """psycopg's bounded pool, with the example project's defaults (the fault tests rely on its bounded waits)."""
    database = dict(dj_database_url.parse(url, conn_max_age=0, conn_health_checks=True))
    options: dict[str, Any] = dict(database.get("OPTIONS") or {})  # type: ignore[call-overload]
    options.setdefault("connect_timeout", 3)
    options.setdefault("keepalives", 1)
    options.setdefault("keepalives_idle", 5)
    options.setdefault("keepalives_interval", 2)
    options.setdefault("keepalives_count", 3)
    options.setdefault("pool", {"min_size": 2, "max_size": 16, "timeout": 5.0})
    database["OPTIONS"] = options
    return database


DATABASES = {"default": _database()}


def _cache() -> dict[str, Any]:
    url = os.environ.get("REDIS_URL")
    if url:
        return {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": url,
            "KEY_PREFIX": "example",  # the Redis namespace the example site's processes of a test use too
            "OPTIONS": {
                "SOCKET_CONNECT_TIMEOUT": 0.5,
                "SOCKET_TIMEOUT": 0.5,
                "CONNECTION_POOL_CLASS": "metering.breaker.BreakerConnectionPool",
                "CONNECTION_POOL_KWARGS": {"breaker_cooldown": 5.0},
            },
        }
    return {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "xaas-tests"}


CACHES = {"default": _cache()}

METERING: dict[str, Any] = {
    "ADAPTER": "metering.adapters.database.DatabaseMeteringAdapter",
    "SINK_URL": None,
    "BATCH_SIZE": 100,
    "API_KEY": None,
    "WEBHOOK_SECRET": None,
    "TENANT_RESOLVER": "tenants.resolvers.api_key_resolver",
}

# TEST_WRITE_MODE=log (``make test-services-log``) runs the suite in log mode, with each append drained at once inside
# the caller's transaction (LOG_DRAIN_EAGER, tests only) so tests read the database as in commit mode. Log mode
# needs Redis: the services run only. Processes a test starts (gunicorn, Celery, subprocess workers) keep their own
# mode unless the test sets it; tests of commit mode's own mechanism are marked ``commit_mode`` (tests/conftest.py).
WRITE_MODE = os.environ.get("TEST_WRITE_MODE", "commit")
if WRITE_MODE not in ("commit", "log"):
    raise ValueError(f"TEST_WRITE_MODE must be 'commit' or 'log', got {WRITE_MODE!r}")
if WRITE_MODE == "log":
    METERING["WRITE_MODE"] = "log"
    METERING["LOG_DRAIN_EAGER"] = True

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
# As the example project: the three apps' periodic tasks (quotas.schedule; check xaas_metering.W050 looks for it).
CELERY_BEAT_SCHEDULE = beat_schedule()

AUTH_PASSWORD_VALIDATORS = [{"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"}]

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
        "metering": {"handlers": ["console"], "level": "WARNING"},
        "tenants": {"handlers": ["console"], "level": "WARNING"},
    },
}

CSRF_FAILURE_VIEW = "project.errors.csrf_failure"

# The Celery app the apps' tasks bind to (``shared_task``): the example site's, configured from these settings
# (``CELERY_*``), the same app the worker processes of a test run.
from project.celery import app as celery_app  # noqa: E402, F401
