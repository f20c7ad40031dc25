"""Hot usage counters in Redis: a cache of the rollups that is exact, and rebuilt from the database when lost.

Each counter is the units of one tenant's subtree for one feature in one window (hour, day, month, total), under
the key ``xaas:{t<root pk>}:u:<tenant pk>:<feature>:<period>:<window start>``. The ``{t<root>}`` hash tag puts a
whole tree in one Redis Cluster slot, so one script may touch every level of a lineage.

Why it stays exact:
- a writer adds to the counters that *exist*, inside its database transaction and while holding its tree's lock
  shared (``tenants.locks``), as the last step before commit;
- a counter is only ever *created* by a rebuild, which takes the tree's lock exclusively, so it waits for every
  in-flight writer, then sums the committed rollups and sets the value. No writer can be counted twice or missed;
- losing Redis (flush, restart, eviction, TTL) only means the next read rebuilds. A writer that fails to reach Redis
  still commits its fact and drops the tree's counters after commit; the TTL bounds staleness if that fails too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from django.db import transaction

from tenants.locks import lock_trees

from . import rollups
from .conf import metering_settings
from .windows import WINDOWED_PERIODS, Period, window

logger = logging.getLogger("metering.counters")

try:  # django-redis is a dependency, but the counters must degrade to "off", never break imports.
    from django_redis import get_redis_connection
    from redis.exceptions import RedisError
except ImportError:  # pragma: no cover
    get_redis_connection = None

    class RedisError(Exception):  # type: ignore[no-redef]
        pass


INCREMENT_EXISTING = """
for _, key in ipairs(KEYS) do
    if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, ARGV[1]) end
end
return 0
"""

_scripts: dict[int, Any] = {}


def client() -> Any | None:
    """The Redis client behind the metering cache alias, or ``None`` when that cache is not django-redis."""
    if get_redis_connection is None:
        return None
    try:
        return get_redis_connection(metering_settings.CACHE_ALIAS)
    except (NotImplementedError, AttributeError, KeyError):
        return None


def tree_tag(root_pk: int) -> str:
    return f"xaas:{{t{root_pk}}}"


USED = "u"
RESERVED = "r"  # quota held by open reservations (``quotas``), kept apart so usage reads never include it


def key(root_pk: int, tenant_pk: int, feature: str, period: Period, start: datetime | None, kind: str = USED) -> str:
    window_id = "all" if start is None else str(int(start.timestamp()))
    return f"{tree_tag(root_pk)}:{kind}:{tenant_pk}:{feature}:{period}:{window_id}"


def keys_for_fact(lineage_pks: Sequence[int], feature: str, timestamp: datetime, kind: str = USED) -> list[str]:
    """Every counter a fact at ``timestamp`` adds to: each level x (hour, day, month, total)."""
    root = lineage_pks[0]
    starts: list[tuple[Period, datetime | None]] = [
        (period, window(period, timestamp)[0]) for period in WINDOWED_PERIODS
    ]
    starts.append(("total", None))
    return [key(root, pk, feature, period, start, kind) for pk in lineage_pks for period, start in starts]


def increment_existing(redis: Any, keys: list[str], units: int) -> None:
    script = _scripts.get(id(redis))
    if script is None:
        script = _scripts[id(redis)] = redis.register_script(INCREMENT_EXISTING)
    script(keys=keys, args=[units])


def read(
    root_pk: int, tenant_pk: int, feature: str, period: Period, start: datetime | None, end: datetime | None
) -> int | None:
    """The counter's units, rebuilt from the database if Redis lost it; ``None`` when Redis is off or down."""
    redis = client()
    if redis is None:
        return None
    counter = key(root_pk, tenant_pk, feature, period, start)
    try:
        value = redis.get(counter)
        if value is not None:
            return int(value)
        return rebuild(redis, root_pk, tenant_pk, feature, counter, start, end)
    except RedisError as error:
        logger.warning("usage counter unavailable, reading the database instead: %s", type(error).__name__)
        return None


def rebuild(
    redis: Any,
    root_pk: int,
    tenant_pk: int,
    feature: str,
    counter: str,
    start: datetime | None,
    end: datetime | None,
) -> int:
    """Set ``counter`` from the committed rollups, with the tree locked exclusively (no writer in flight)."""
    using = metering_settings.DATABASE_ALIAS
    with transaction.atomic(using=using):
        lock_trees([root_pk], exclusive=True, using=using)
        units = rollups.sum_units(tenant_pk, feature, start, end, using=using)
        redis.set(counter, units, ex=int(metering_settings.COUNTER_TTL_SECONDS))
    return units


class DropIfCommitFails:
    """Around a transaction that changes a tree's counters before its COMMIT: if the block fails after
    ``counted()`` (the COMMIT itself, or its outcome unknown), the tree's counters cannot be trusted: drop them, so
    the next reader rebuilds them from the database."""

    def __init__(self, root_pk: int) -> None:
        self.root_pk = root_pk
        self._counted = False

    def counted(self) -> None:
        self._counted = True

    def __enter__(self) -> DropIfCommitFails:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        if kind is not None and self._counted:
            drop_trees([self.root_pk])


def drop_trees(root_pks: Iterable[int]) -> None:
    """Forget every counter of these trees (after a move, or a write Redis did not see)."""
    redis = client()
    if redis is None:
        return
    try:
        for root_pk in root_pks:
            batch = list(redis.scan_iter(match=f"{tree_tag(root_pk)}:*", count=1000))
            for offset in range(0, len(batch), 500):
                redis.delete(*batch[offset : offset + 500])
    except RedisError as error:
        logger.error("could not drop usage counters of trees %s: %s", sorted(root_pks), type(error).__name__)
