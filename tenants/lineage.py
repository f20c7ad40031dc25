"""Reading a tenant's lineage: one query, or none when cached in a shared cache. Invalidated on commit when the
tree changes.

Only a cache that every process shares (Redis, Memcached, the database cache...) may hold lineages: an invalidation
reaches every process through it. A per-process cache (``LocMemCache``, Django's default and the example project's
embedded one, or ``DummyCache``) is never used for them, since an invalidation in one process would leave the others
acting for minutes on a deactivated, moved or no longer exempt tenant; there each read is one query (on SQLite, in
process). Entries are keyed in the site's namespace (``tenants.namespace``), so sites sharing a Redis never read
each other's lineages.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from asgiref.sync import sync_to_async
from django.core.cache import BaseCache, caches
from django.core.cache.backends.dummy import DummyCache
from django.core.cache.backends.locmem import LocMemCache
from django.db import connection

from . import namespace
from .conf import tenant_settings
from .context import TenantContext, TenantRef
from .exceptions import InactiveTenant, InvalidTenantId, UnknownTenant
from .models import TENANT_ID_RE, Tenant

CACHE_PREFIX = "lineage:v2:"  # in the site's namespace
logger = logging.getLogger("tenants.lineage")
TOMBSTONE = "invalidated"
TOMBSTONE_SECONDS = 5  # far longer than a read-then-cache of a lineage takes (a query and a SET)
PER_PROCESS_BACKENDS: tuple[type[BaseCache], ...] = (LocMemCache, DummyCache)


def _cache_key(tenant_id: str) -> str:
    return namespace.current().cache_key(CACHE_PREFIX + tenant_id)


def cache_is_shared(alias: str | None = None) -> bool:
    """Whether the lineage cache is one every process sees (else lineages are not cached at all)."""
    try:
        cache = caches[alias or tenant_settings.CACHE_ALIAS]
    except Exception:  # a misconfigured alias: the system checks say so; here, read the database
        return False
    return not isinstance(cache, PER_PROCESS_BACKENDS)


def validate_tenant_id(tenant_id: object) -> str:
    """``tenant_id`` if it is a tenant id a ``Tenant`` could have (``TENANT_ID_RE``, the model's own grammar: 1-128
    ASCII letters, digits and ``. _ : @ -``, starting with a letter or digit). Raises ``InvalidTenantId``.

    The grammar refuses by construction what no tenant can be called: NUL, lone surrogates, control (Cc) and format
    (Cf) characters — a zero-width space or a right-to-left override would make two ids look the same — whitespace
    anywhere, the empty string and a trailing newline (matched on the whole string)."""
    if not isinstance(tenant_id, str) or not 1 <= len(tenant_id) <= 128 or not TENANT_ID_RE.fullmatch(tenant_id):
        shown = repr(tenant_id) if isinstance(tenant_id, str) and len(tenant_id) <= 140 else type(tenant_id).__name__
        raise InvalidTenantId(
            "tenant_id must be 1-128 characters: letters, digits and . _ : @ -, starting with a letter or digit; "
            f"got {shown}"
        )
    return str(tenant_id)


def get_context(tenant_id: str, *, require_active: bool = True, use_cache: bool = True) -> TenantContext:
    """The ``TenantContext`` of ``tenant_id``. Raises ``UnknownTenant``, or ``InactiveTenant`` when asked."""
    tenant_id = validate_tenant_id(tenant_id)
    cached = use_cache and cache_is_shared()
    found: Any = _cache_call("get", _cache_key(tenant_id)) if cached else None
    rows: list[tuple[Any, ...]] | None = None if found == TOMBSTONE else found
    if rows is None:
        rows = _load_lineage(tenant_id)
        if cached and found != TOMBSTONE:
            # ``add``, not ``set``: a reader that loaded the rows just before a change committed must not write them
            # over the change's tombstone (``invalidate``).
            _cache_call("add", _cache_key(tenant_id), rows, tenant_settings.LINEAGE_CACHE_TIMEOUT)
    context = TenantContext(tenant_id=tenant_id, lineage=tuple(TenantRef(*row) for row in rows))
    if require_active and not context.is_active:
        inactive = next(level.tenant_id for level in context.lineage if not level.is_active)
        raise InactiveTenant(f"tenant {tenant_id!r} is inactive (deactivated at {inactive!r})")
    return context


async def aget_context(tenant_id: str, *, require_active: bool = True, use_cache: bool = True) -> TenantContext:
    """``get_context`` for async code (the database and cache calls run in a worker thread, as Django's ORM needs)."""
    return await sync_to_async(get_context)(tenant_id, require_active=require_active, use_cache=use_cache)


def _cache_call(method: str, *args: Any) -> Any:
    """A cache call that degrades to a miss: an unreachable cache must not stop usage from being recorded."""
    try:
        return getattr(caches[tenant_settings.CACHE_ALIAS], method)(*args)
    except Exception as error:  # the cache backend's own errors (e.g. redis ConnectionError)
        # DEBUG when an open Redis breaker refused the call (it logged the outage once: no line per request).
        level = logging.DEBUG if getattr(error, "reported", False) else logging.WARNING
        logger.log(level, "lineage cache %s failed: %s", method, type(error).__name__)
        return None


def _load_lineage(tenant_id: str) -> list[tuple[Any, ...]]:
    # One query: a recursive walk up the parent links, each step a primary-key lookup.
    table = connection.ops.quote_name(Tenant._meta.db_table)
    sql = f"""
        WITH RECURSIVE lineage(id, external_id, kind, exempt, is_active, parent_id, depth) AS (
            SELECT id, external_id, kind, exempt, is_active, parent_id, depth FROM {table} WHERE external_id = %s
            UNION ALL
            SELECT t.id, t.external_id, t.kind, t.exempt, t.is_active, t.parent_id, t.depth
            FROM {table} t JOIN lineage ON t.id = lineage.parent_id
        )
        SELECT id, external_id, kind, exempt, is_active FROM lineage ORDER BY depth
    """  # noqa: S608 (the table name is ours, the value is a parameter)
    with connection.cursor() as cursor:
        cursor.execute(sql, [tenant_id])
        rows = [(pk, ext, kind, bool(exempt), bool(active)) for pk, ext, kind, exempt, active in cursor.fetchall()]
    if not rows:
        raise UnknownTenant(f"unknown tenant {tenant_id!r}")
    return rows


def invalidate(tenant_ids: Iterable[str]) -> None:
    if not cache_is_shared():
        return  # nothing was cached
    keys = [_cache_key(tenant_id) for tenant_id in tenant_ids]
    if keys:
        # A tombstone rather than a delete: a process that read the lineage before the change committed and caches
        # it afterwards would otherwise put the old lineage back for LINEAGE_CACHE_TIMEOUT. While the tombstone
        # lives, reads go to the database and nobody caches; afterwards the first reader caches the new lineage.
        _cache_call("set_many", dict.fromkeys(keys, TOMBSTONE), TOMBSTONE_SECONDS)


def invalidate_subtree(path: str) -> None:
    """Forget the cached lineage of every tenant whose path starts with ``path``."""
    if not cache_is_shared():
        return  # nothing was cached
    invalidate(Tenant.objects.filter(path__startswith=path).values_list("external_id", flat=True))
