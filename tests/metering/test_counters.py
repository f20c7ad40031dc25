"""Hot usage counters in a real Redis: served from Redis, exact, and rebuilt from the database when lost."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from metering import counters
from metering.models import UsageRollup
from metering.windows import window
from tenants.lineage import get_context
from tenants.tree import move_tenant
from tests.factories import record, tree, usage
from tests.modes import FALLBACK

pytestmark = pytest.mark.django_db

ORG = {"org": None, "p1": "org", "p2": "org", "k1": "p1", "k2": "p1", "k3": "p2"}


def month_now():
    return window("month", datetime.now(UTC))


def counter_key(tenant_id: str, period: str = "month"):
    context = get_context(tenant_id)
    start = window(period, datetime.now(UTC))[0]  # type: ignore[arg-type]
    epoch = counters.current_epoch(context.root.pk, "default")
    return counters.key(context.root.pk, context.tenant.pk, "llm_tokens", period, start, epoch=epoch)  # type: ignore[arg-type]


def test_hot_counters_are_served_from_redis_and_follow_writes(redis_cache):
    tree(ORG)
    record("k1", "1.5")
    assert usage("org", "llm_tokens", *month_now()) == Decimal("1.5")  # a miss: rebuilt from the rollups
    assert int(redis_cache.get(counter_key("org"))) == 1_500_000
    record("k2", 2)
    record("k3", "0.25")
    assert int(redis_cache.get(counter_key("org"))) == 3_750_000  # writers add to the live counter
    get_context("org")
    with CaptureQueriesContext(connection) as queries:
        assert usage("org", "llm_tokens", *month_now()) == Decimal("3.75")
    # A hit costs one primary-key lookup (the tree's counter epoch, so no counter from before an outage is served)
    # and no sum.
    assert len(queries) == 1 and "counterepoch" in queries[0]["sql"]
    assert usage("p1", "llm_tokens", None, None) == Decimal("3.5")
    assert int(redis_cache.get(counter_key("p1", "total"))) == 3_500_000


def test_flushing_redis_mid_way_loses_nothing(redis_cache):
    tree(ORG)
    windows = [month_now(), window("day", datetime.now(UTC)), window("hour", datetime.now(UTC)), (None, None)]
    for index in range(10):
        record(f"k{index % 3 + 1}", index)
        if index == 4:
            for start, end in windows:
                usage("org", "llm_tokens", start, end)  # counters built
            redis_cache.flushdb()  # Redis loses everything, lineages included
        if index == 7:
            for start, end in windows:
                usage("p1", "llm_tokens", start, end)
    for start, end in windows:
        assert usage("org", "llm_tokens", start, end) == 45
        assert usage("p1", "llm_tokens", start, end) == sum(i for i in range(10) if i % 3 in (0, 1))
    # The counters agree with the database rollups, not just with the cached answer.
    assert int(redis_cache.get(counter_key("org"))) == 45_000_000


def test_a_move_drops_the_counters_of_both_trees(redis_cache):
    tree({**ORG, "other": None, "o1": "other"})
    record("k1", 5)
    record("o1", 7)
    assert usage("p1", "llm_tokens", *month_now()) == 5
    assert usage("other", "llm_tokens", *month_now()) == 7
    move_tenant("p1", "other")
    from tenants.lineage import invalidate

    invalidate(["p1", "k1", "k2"])  # the on-commit invalidation does not run inside the test's transaction
    assert usage("other", "llm_tokens", *month_now()) == 12
    assert usage("org", "llm_tokens", *month_now()) == 0
    assert usage("p1", "llm_tokens", *month_now()) == 5


@pytest.mark.commit_mode(FALLBACK)
def test_writes_survive_an_unreachable_redis():
    tree(ORG)
    dead = {"default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": "redis://127.0.0.1:1/0"}}
    # Counters and lineages live in a Redis nobody answers: facts are still stored and counted exactly.
    with override_settings(CACHES=dead):
        record("k1", 3)
        record("k2", 4)
        assert usage("org", "llm_tokens", *month_now()) == 7
        assert usage("org") == 7
    assert UsageRollup.objects.filter(tenant__external_id="org").get().units == 7_000_000


def test_backdated_facts_update_their_own_windows_counters(redis_cache):
    tree(ORG)
    last_month_moment = month_now()[0] - timedelta(days=3)
    previous = window("month", last_month_moment)
    record("k1", 2, timestamp=last_month_moment)
    assert usage("org", "llm_tokens", *previous) == 2
    record("k1", 3, timestamp=last_month_moment + timedelta(hours=1))
    assert usage("org", "llm_tokens", *previous) == 5
    assert usage("org", "llm_tokens", *month_now()) == 0
