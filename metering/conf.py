"""Metering settings: ``settings.METERING``, read at use time so ``override_settings`` works.

The keys mirror the product brief's ``[metering]`` table (``ADAPTER``, ``SINK_URL``, ``BATCH_SIZE``) plus the
limits that keep bad input out. Tenant keys (``TENANT_HEADER``, ``TENANT_RESOLVER``, ``CACHE_ALIAS``,
``LINEAGE_CACHE_TIMEOUT``, ``MAX_TREE_DEPTH``) live in ``tenants.conf``.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings as django_settings

from tenants.conf import DEFAULTS as TENANT_DEFAULTS

DEFAULTS: dict[str, Any] = {
    "ADAPTER": "metering.adapters.database.DatabaseMeteringAdapter",
    "SINK_URL": None,
    "BATCH_SIZE": 100,
    "API_KEY": None,
    # Which database and cache hold usage. A django-redis cache turns on the Redis counters.
    "DATABASE_ALIAS": "default",
    # Bad-input limits.
    "MAX_QUANTITY": Decimal("1000000000000"),
    "MAX_METADATA_BYTES": 1024,  # a maximal 1,000-event request then adds ~1.5 MB on PostgreSQL (4096: ~6 MB)
    "MAX_FEATURE_NAME_LENGTH": 100,
    # Abuse bounds: what one key (one tree) may write. Each refusal is a named InvalidUsageEvent (4xx over HTTP).
    "MAX_FEATURES_PER_TREE": 1000,  # distinct feature names one tree may hold; None: unbounded
    # distinct features the subtree of an API key below its tree's root may hold when the key brings a feature new
    # to the tree (POST /api/v1/events); None: only MAX_FEATURES_PER_TREE. One key cannot spend the tree's budget.
    "MAX_FEATURES_PER_KEY": 100,
    "FEATURES": None,  # an allowlist of feature names (any iterable of str); None: any valid name
    # "open": an unregistered feature is a sum (as before the registry); "closed": only registered features
    # (FeatureDefinition: admin, `manage.py feature`) may be recorded or reserved (metering.features)
    "FEATURE_REGISTRY": "open",
    "MAX_BACKDATE": timedelta(days=35),  # how far back a fact may be dated (timedelta or seconds); None: to 1970
    "MAX_FUTURE": None,  # how far ahead (timedelta or seconds); None: FUTURE_TOLERANCE_SECONDS (5 minutes)
    "FUTURE_TOLERANCE_SECONDS": 300,  # the older name of MAX_FUTURE, honoured while MAX_FUTURE is None
    "MAX_EVENTS_PER_REQUEST": 1000,  # events in one POST /api/v1/events (1 to 1000)
    "API_RATE": "6000/min",  # requests per API key ("N/s", "N/min", "N/hour", "N/day"); None: no throttle
    # Routes the quota middleware meters: [{"url_name" or "path_prefix": ..., "feature": ..., "quantity": 1}].
    "QUOTA_ROUTES": [],
    # Redis counters are rebuilt from the database at least this often (self-healing bound).
    "COUNTER_TTL_SECONDS": 3600,
    # Outbox delivery (LagoMeteringAdapter, WebhookMeteringAdapter): see docs/lago.md.
    "WEBHOOK_SECRET": None,  # HMAC-SHA256 key of the webhook sink's X-Metering-Signature header
    "LAGO_METRICS": {},  # feature -> "code" or {"code": ..., "property": ..., "metadata": True|False|[keys]}
    "LAGO_QUANTITY_PROPERTY": "quantity",  # the property carrying the quantity when LAGO_METRICS names none
    "LAGO_QUALIFY_TRANSACTION_ID": True,  # Lago transaction_id = "<tenant id>/<transaction id>" (unique per sub)
    "SINKS": None,  # dotted paths of the sinks every fact goes to; None: the outbox adapter's own sink_class
    "CLICKHOUSE_URL": None,  # the clickhouse sink's HTTP interface, e.g. "http://clickhouse.internal:8123"
    "CLICKHOUSE_DATABASE": "default",
    "CLICKHOUSE_TABLE": "usage_facts",
    "CLICKHOUSE_USER": "default",  # sent as X-ClickHouse-User
    "CLICKHOUSE_PASSWORD": None,  # sent as X-ClickHouse-Key (never in the URL)
    "CLICKHOUSE_BATCH_SIZE": 10_000,  # rows per INSERT: ClickHouse wants few large inserts
    "SINK_TIMEOUT_SECONDS": 10,  # connect/read/write/pool timeout of each request
    "SINK_LEASE_SECONDS": 60,  # a claimed batch is re-claimable after this (a worker died mid-batch)
    "SINK_RETRY_BASE_SECONDS": 1,  # exponential backoff with jitter: base * 2**(attempts - 1) ...
    "SINK_RETRY_MAX_SECONDS": 300,  # ... capped here (Retry-After / X-RateLimit-Reset can ask for longer)
    "SINK_MAX_ATTEMPTS": None,  # None: transient failures are retried until they succeed; N: dead after N
    "SINK_BISECT_AFTER": 3,  # 5xx answers to a fact's batches before they are split (a poison fact waits alone)
    "FLUSH_MAX_BATCHES": 200,  # batches one flush task sends before handing over to a fresh task
    "TRIGGER_DEBOUNCE_SECONDS": 1,  # at most one after-commit flush task per sink this often
    "CELERY_QUEUE": None,  # queue of the delivery tasks (None: Celery's default queue)
    # Write path (docs: README "Write modes"). "commit": each fact is committed to the database before the view runs
    # on. "log": one Redis Lua call decides, counts, de-duplicates and appends the fact to its tree's Redis stream;
    # a drainer (metering_drain / the drain_log Celery task) persists the stream in batches. Needs Redis with AOF.
    "WRITE_MODE": "commit",
    "LOG_DEDUP_SECONDS": 3600,  # log mode: a transaction id is refused as a duplicate at once within this window
    "LOG_DRAIN_BATCH": 5000,  # stream entries one drain transaction persists
    "LOG_REFRESH_SECONDS": 1.0,  # log mode: how long a process trusts its cached lineage/epoch without the DB
    # PostgreSQL: each (tenant, feature, hour) is split over this many writer rows (1 to 99), so concurrent writers
    # of one tree do not queue on one row; the fold_rollups beat task merges hours that are over (metering.rollups).
    "ROLLUP_SLOTS": 16,
    # log mode: entries younger than this by Redis's clock wait (their AOF fsync); None: 0 under appendfsync always,
    # else 2 s (README "Log mode durability")
    "LOG_DRAIN_DELAY_SECONDS": None,
    "LOG_DRAIN_IDLE_SECONDS": 0.2,  # metering_drain: the sleep when nothing was due
    "LOG_DRAIN_TASK_BATCHES": 20,  # batches one drain_log task persists before handing over to a fresh task
    # log mode, FOR TESTS AND DEVELOPMENT ONLY, never production: each append drains its tree at once, inside the
    # caller's transaction, so the database reads as in commit mode (the whole suite runs this way: TEST_WRITE_MODE)
    "LOG_DRAIN_EAGER": False,
}

KNOWN_KEYS = frozenset(DEFAULTS) | frozenset(TENANT_DEFAULTS)


class MeteringSettings:
    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(name)
        return getattr(django_settings, "METERING", {}).get(name, DEFAULTS[name])

    @property
    def CACHE_ALIAS(self) -> str:
        return str(getattr(django_settings, "METERING", {}).get("CACHE_ALIAS", TENANT_DEFAULTS["CACHE_ALIAS"]))


metering_settings = MeteringSettings()
