"""Metering settings: ``settings.METERING``, read at use time so ``override_settings`` works.

The keys mirror the product brief's ``[metering]`` table (``ADAPTER``, ``SINK_URL``, ``BATCH_SIZE``) plus the
limits that keep bad input out. Tenant keys (``TENANT_HEADER``, ``TENANT_RESOLVER``, ``CACHE_ALIAS``,
``LINEAGE_CACHE_TIMEOUT``, ``MAX_TREE_DEPTH``) live in ``tenants.conf``.
"""

from __future__ import annotations

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
    "MAX_METADATA_BYTES": 4096,
    "MAX_FEATURE_NAME_LENGTH": 100,
    "FUTURE_TOLERANCE_SECONDS": 300,
    # Routes the quota middleware meters: [{"url_name" or "path_prefix": ..., "feature": ..., "quantity": 1}].
    "QUOTA_ROUTES": [],
    # Redis counters are rebuilt from the database at least this often (self-healing bound).
    "COUNTER_TTL_SECONDS": 3600,
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
