"""The hot path's statements: the fact's transaction in its documented order, commit failures, rules by epoch.

These run outside any test transaction (``transaction=True``), so the ``BEGIN`` and ``COMMIT`` are real.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.test.utils import override_settings

from metering import counters
from metering.adapters.database import DatabaseMeteringAdapter
from metering.events import ValidEvent, utcnow
from metering.exceptions import DuplicateUsageEvent
from metering.models import UsageRecord, UsageRollup
from quotas.exceptions import QuotaExceeded
from quotas.handler import QuotaPolicyHandler
from quotas.models import QuotaLimit, QuotaReservation
from tenants.context import TenantContext
from tenants.lineage import get_context
from tests.factories import record, tree, usage
from tests.modes import FALLBACK, WRITE_UNIT
from tests.quota_helpers import limit

pytestmark = pytest.mark.django_db(transaction=True)

ORG = {"org": None, "p1": "org", "p2": "org", "k1": "p1", "k2": "p1", "k3": "p2"}


@pytest.fixture(params=["database", "redis"])
def backend(request):
    if request.param == "redis":
        request.getfixturevalue("redis_cache")
    return request.param


class CommitFailsAdapter(DatabaseMeteringAdapter):
    """Writes, inside the fact's transaction, a row whose foreign key is checked only at COMMIT, which then fails."""

    def on_stored(self, valid: ValidEvent, record_id: int, context: TenantContext) -> None:
        now = utcnow()
        QuotaReservation.objects.create(
            tenant_id=context.tenant.pk,
            feature=valid.feature_name,
            units=1,
            window_at=now,
            expires_at=now + timedelta(minutes=1),
            state=QuotaReservation.State.COMMITTED,
            record_id=record_id + 10**9,  # no such fact: the deferred constraint fails the COMMIT
        )


@contextmanager
def commits_fail() -> Iterator[None]:
    with override_settings(
        METERING={**settings.METERING, "ADAPTER": "tests.metering.test_roundtrip.CommitFailsAdapter"}
    ):
        yield


@contextmanager
def sent_in_order() -> Iterator[list[str]]:
    """Every statement the default connection sends (``BEGIN`` and ``COMMIT`` are the driver's, not listed) and
    every Redis command this process sends (as ``"redis <COMMAND>"``), in the order they went out."""
    import redis.client

    sent: list[str] = []

    def spy(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        sent.append(sql)
        return execute(sql, params, many, context)

    original = redis.client.Redis.execute_command

    def command(self: Any, *args: Any, **options: Any) -> Any:
        sent.append(f"redis {str(args[0]).upper()}")
        return original(self, *args, **options)

    redis.client.Redis.execute_command = command  # type: ignore[method-assign]
    try:
        with connection.execute_wrapper(spy):
            yield sent
    finally:
        redis.client.Redis.execute_command = original  # type: ignore[method-assign]


def kinds(sent: list[str]) -> list[str]:
    """Each statement named by what it does, from the transaction's first (the lineage and rules are read before,
    from the cache)."""
    named = []
    for sql in sent:
        if sql.startswith("redis "):
            named.append(sql)
        elif "pg_advisory_xact_lock_shared" in sql:
            named.append("tree lock")
        elif "pg_advisory_xact_lock(" in sql:
            named.append("lock")
        elif sql.startswith('INSERT INTO "xaas_metering_usagerecord"'):
            named.append("fact")
        elif sql.startswith('WITH fact AS (INSERT INTO "xaas_metering_usagerecord"') and "rolled AS" in sql:
            named.append("fact+rollups")
        elif sql.startswith('INSERT INTO "xaas_metering_usagerollup"'):
            named.append("rollups")
        elif sql.startswith('UPDATE "xaas_quotas_quotareservation"'):
            named.append("close reservation")
        elif sql.startswith('INSERT INTO "xaas_quotas_quotareservation"'):
            named.append("reservation")
        elif sql.startswith("SET LOCAL synchronous_commit TO OFF"):
            named.append("no disk wait")
        elif sql.startswith(("SAVEPOINT", "RELEASE SAVEPOINT")):
            continue
        else:
            named.append(sql.split()[0])
    first = next((index for index, kind in enumerate(named) if kind in ("tree lock", "no disk wait")), 0)
    return named[first:]


@pytest.mark.commit_mode(WRITE_UNIT)
def test_a_consumption_whose_commit_fails_is_neither_stored_nor_counted(backend):
    tree(ORG)
    limit("org", 10)
    QuotaPolicyHandler("k1").consume("llm_tokens", 4)
    with commits_fail(), pytest.raises(IntegrityError):
        QuotaPolicyHandler("k1").consume("llm_tokens", 3)
    assert UsageRecord.objects.count() == 1
    assert usage("org") == 4 and usage("k1") == 4
    # Had the 3 units stayed in the counters, the organization would have room for 3 only.
    assert QuotaPolicyHandler("k3").consume("llm_tokens", 6).allowed
    with pytest.raises(QuotaExceeded):
        QuotaPolicyHandler("k2").consume("llm_tokens", "0.000001")


@pytest.mark.commit_mode(WRITE_UNIT)
def test_a_recording_whose_commit_fails_leaves_usage_reads_exact(backend):
    tree(ORG)
    record("k1", 2)
    assert usage("org") == 2  # with Redis, the organization's counter now exists
    with commits_fail(), pytest.raises(IntegrityError):
        record("k1", 5)
    assert usage("org") == 2 and usage("p1") == 2
    assert list(UsageRollup.objects.values_list("units", flat=True).distinct()) == [2_000_000]


def test_the_connection_is_usable_and_in_autocommit_after_a_failed_transaction(backend):
    tree(ORG)
    with commits_fail(), pytest.raises(IntegrityError):
        record("k1", 5)
    assert connection.get_autocommit() and not connection.in_atomic_block
    record("k1", 1, transaction_id="after")
    assert UsageRecord.objects.filter(transaction_id="after").exists()


def test_a_caller_transaction_rolled_back_takes_the_fact_and_its_rollups_with_it(backend):
    tree(ORG)
    with pytest.raises(RuntimeError), transaction.atomic():
        record("k1", 5)
        assert usage("org") == 5  # visible inside the caller's transaction
        raise RuntimeError("the caller gives up")
    assert not UsageRecord.objects.exists() and not UsageRollup.objects.exists()
    # (Live Redis counters keep the 5 until rebuilt: see "Over-count after an outer rollback" in the README.)


@pytest.mark.commit_mode(WRITE_UNIT)
def test_on_postgresql_a_fact_is_the_tree_lock_the_fact_and_its_rollups(on_postgres):
    tree(ORG)
    record("k1", 1)  # warm: lineage cached, the tree's feature known
    with sent_in_order() as sent:
        record("k1", 2, metadata={"model": "m"})
    assert [kind for kind in kinds(sent) if not kind.startswith("redis")] == ["tree lock", "fact", "rollups"], sent
    assert usage("org") == 3 and usage("k1") == 3
    assert UsageRecord.objects.get(units=2_000_000).metadata == {"model": "m"}


@pytest.mark.commit_mode(WRITE_UNIT)
def test_an_enforced_consumption_upserts_the_shared_rollups_only_after_the_redis_decision(on_postgres, redis_cache):
    """The rollup rows every writer of the tree shares are locked from their upsert to the COMMIT: never while this
    process waits for Redis."""
    tree(ORG)
    limit("org", 100)
    QuotaPolicyHandler("k1").consume("llm_tokens", 1)  # warm: lineage, rules and counters
    with sent_in_order() as sent:
        QuotaPolicyHandler("k1").consume("llm_tokens", 2)
    assert kinds(sent) == ["tree lock", "fact", "redis EVALSHA", "rollups"], sent
    reservation = QuotaPolicyHandler("k1").reserve("llm_tokens", 5)
    with sent_in_order() as sent:
        QuotaPolicyHandler("k1").reserve("llm_tokens", 5).release()
    assert kinds(sent)[:4] == ["no disk wait", "tree lock", "reservation", "redis EVALSHA"], sent
    with sent_in_order() as sent:
        reservation.commit(4)  # the reservation is closed in the fact's transaction, before the decision
    assert kinds(sent) == ["tree lock", "fact", "close reservation", "redis EVALSHA", "rollups"], sent
    assert usage("org") == 7
    assert QuotaReservation.objects.get(pk=reservation.row.pk).state == QuotaReservation.State.COMMITTED


@pytest.mark.commit_mode(FALLBACK)
def test_without_redis_the_decision_sums_rollups_written_with_the_fact(on_postgres):
    tree(ORG)
    limit("org", 5)
    with override_settings(CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}):
        QuotaPolicyHandler("k1").consume("llm_tokens", 1)
        with sent_in_order() as sent:
            QuotaPolicyHandler("k1").consume("llm_tokens", 2)
        # The tree's decisions on the feature are serialized by a named lock; the sums then include this fact.
        assert kinds(sent)[:3] == ["tree lock", "lock", "fact+rollups"], sent
        assert not [kind for kind in kinds(sent) if kind.startswith("redis")]
        with pytest.raises(QuotaExceeded):
            QuotaPolicyHandler("k2").consume("llm_tokens", 3)
    assert usage("org") == 3 and UsageRecord.objects.count() == 2


def test_a_duplicate_writes_no_rollup(backend):
    tree(ORG)
    record("k1", 2, transaction_id="once")
    with pytest.raises(DuplicateUsageEvent):
        record("k1", 2, transaction_id="once")
    assert usage("org") == 2 and UsageRecord.objects.count() == 1


def test_a_limit_changed_in_another_process_applies_to_the_next_decision(redis_cache):
    tree(ORG)
    quota = limit("org", 10)
    handler = QuotaPolicyHandler("k1")
    handler.consume("llm_tokens", 5)  # this process now holds the organization's rules in memory
    root = get_context("k1").root.pk
    before = counters.current_epoch(root, "default")
    # Another process lowers the limit through the model: the row changes and its transaction bumps the tree's
    # epoch; this process's memory is told nothing.
    with transaction.atomic():
        QuotaLimit.objects.filter(pk=quota.pk).update(limit=Decimal(6))
        counters.bump_epochs([root], "default")
    assert counters.current_epoch(root, "default") != before
    with pytest.raises(QuotaExceeded) as blocked:
        QuotaPolicyHandler("k1").consume("llm_tokens", 2)
    assert blocked.value.limit == 6


def test_saving_or_deleting_a_limit_bumps_its_trees_epoch_in_its_own_transaction(backend):
    tree(ORG)
    tree({"elsewhere": None})
    quota = limit("p1", 10)
    org, elsewhere = get_context("org").root.pk, get_context("elsewhere").root.pk
    epochs = {org: counters.current_epoch(org, "default"), elsewhere: counters.current_epoch(elsewhere, "default")}
    quota.limit = Decimal(2)
    with transaction.atomic():
        quota.save()
        assert counters.current_epoch(org, "default") != epochs[org]  # with the change, not after it
        transaction.set_rollback(True)
    assert counters.current_epoch(org, "default") == epochs[org]  # rolled back together
    quota.save()
    assert counters.current_epoch(elsewhere, "default") == epochs[elsewhere]  # another tree's rules stay cached
    with pytest.raises(QuotaExceeded):
        QuotaPolicyHandler("k2").consume("llm_tokens", 3)
    bumped = counters.current_epoch(org, "default")
    quota.delete()
    assert counters.current_epoch(org, "default") != bumped
    assert QuotaPolicyHandler("k2").consume("llm_tokens", 3).allowed


def test_rules_read_under_an_older_epoch_are_reloaded(backend):
    from quotas import rules

    tree(ORG)
    limit("org", 10)
    context = get_context("k1")
    root = context.root.pk
    epoch = counters.current_epoch(root, "default")
    first = rules.ruleset(context, "llm_tokens", epoch)
    assert rules.ruleset(context, "llm_tokens", epoch) is first  # from memory
    QuotaLimit.objects.filter(tenant__external_id="org").update(limit=Decimal(4))  # no bump: not seen
    assert rules.ruleset(context, "llm_tokens", epoch).rules[0].limit == 10
    assert rules.ruleset(context, "llm_tokens", epoch + 1).rules[0].limit == 4  # another epoch: reloaded


def test_a_reservation_inside_a_callers_transaction_leaves_its_commits_durable(on_postgres, redis_cache):
    tree(ORG)
    limit("org", 100)
    with transaction.atomic():
        QuotaPolicyHandler("k1").reserve("llm_tokens", 5).commit(5)
        with connection.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            assert cursor.fetchone()[0] == "on"  # the fact written in this transaction waits for the disk
    assert usage("org") == 5


def test_a_failing_usage_recorded_receiver_does_not_fail_a_stored_fact(backend, caplog):
    from metering.signals import usage_recorded

    tree(ORG)

    def broken(**kwargs: object) -> None:
        raise RuntimeError("a receiver bug")

    usage_recorded.connect(broken)
    try:
        record("k1", 2, transaction_id="kept")
    finally:
        usage_recorded.disconnect(broken)
    assert UsageRecord.objects.filter(transaction_id="kept").exists()
    assert usage("org") == 2
    assert "a receiver bug" in caplog.text


@pytest.mark.commit_mode(FALLBACK)
def test_quotas_hold_exactly_when_redis_is_unreachable_mid_decision(backend):
    """The decision falls back to the database while this fact's rollups are still to be written: it must count it."""
    tree(ORG)
    limit("org", 5)
    QuotaPolicyHandler("k1").consume("llm_tokens", 2)
    dead = {"default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": "redis://127.0.0.1:1/0"}}
    with override_settings(CACHES=dead):
        assert QuotaPolicyHandler("k1").consume("llm_tokens", 3).tightest.remaining == 0
        with pytest.raises(QuotaExceeded) as blocked:
            QuotaPolicyHandler("k2").consume("llm_tokens", 1)
    assert blocked.value.used == 5
    assert usage("org") == 5 and UsageRecord.objects.count() == 2
