"""Rollup slots (metering.rollups): an hour is the sum of its slot rows, exactly, at the edge of the range too; no
sum of slots ever passes the range; concurrent writers of one tree (separate processes) and the fold beside them
keep rollups == facts; reconcile and moves stay exact; the migration converts existing rows."""

from __future__ import annotations

import multiprocessing
import random
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from django.conf import settings
from django.db import connection
from django.db.models import Count, Max, Sum
from django.test import override_settings

from metering import rollups
from metering.charts import daily_usage
from metering.events import units_to_quantity
from metering.exceptions import UsageTotalOutOfRange
from metering.models import UsageRecord, UsageRollup
from metering.usage import _units_from_database, get_usage_units, usage_by_tenant_and_feature
from metering.windows import floor_hour
from tenants.lineage import get_context
from tenants.models import Tenant
from tenants.tree import move_tenant
from tests.factories import record, tree
from tests.modes import ROLLUP_RANGE, ROLLUP_SLOTS
from tests.slot_writer import write

HOUR = floor_hour(datetime.now(UTC)) - timedelta(hours=3)


def requires_postgresql() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("SQLite serializes writers: every rollup row is slot 0 there")


def slots(**changes: object) -> override_settings:
    return override_settings(METERING={**getattr(settings, "METERING", {}), **changes})


def hour_units(tenant_id: str, hour: datetime = HOUR) -> int:
    return _units_from_database(get_context(tenant_id), "llm_tokens", hour, hour + timedelta(hours=1))


def rows_within_bounds() -> None:
    """Every row within its slot's bound, at most SLOT_ROWS slots: the invariant that keeps each sum in range."""
    for slot, units in UsageRollup.objects.values_list("slot", "units"):
        if connection.vendor == "postgresql":
            assert 0 <= units <= (rollups.BASE_UNITS if slot == 0 else rollups.SLOT_UNITS), (slot, units)
        else:
            assert slot == 0 and 0 <= units <= rollups.SQLITE_MAX_UNITS


def facts_equal_rollups() -> None:
    """Every tenant's rollups (units and events, summed over hours and slots) == its subtree's facts."""
    for tenant in Tenant.objects.all():
        facts = UsageRecord.objects.filter(tenant__path__startswith=tenant.path).aggregate(
            u=Sum("units"), n=Count("id")
        )
        rolled = UsageRollup.objects.filter(tenant=tenant).aggregate(u=Sum("units"), n=Sum("events"))
        assert (int(facts["u"] or 0), facts["n"]) == (int(rolled["u"] or 0), int(rolled["n"] or 0)), tenant.external_id


# ---- the exact range, over slots ----


def test_pack_fills_the_range_exactly_and_refuses_one_unit_more():
    vendor = connection.vendor
    largest = rollups.POSTGRES_MAX_UNITS if vendor == "postgresql" else rollups.SQLITE_MAX_UNITS
    for total in (0, 1, rollups.SLOT_UNITS, rollups.BASE_UNITS + 1, largest - 1, largest):
        if vendor != "postgresql" and total > largest:
            continue
        packed = rollups.pack(total, 7, vendor)
        assert sum(units for _, units, _ in packed) == total and sum(events for *_, events in packed) == 7
        assert [slot for slot, _, _ in packed] == list(range(len(packed))) and len(packed) <= rollups.SLOT_ROWS
        for slot, units, _ in packed:
            assert units <= (rollups.BASE_UNITS if slot == 0 or vendor != "postgresql" else rollups.SLOT_UNITS)
    assert len(rollups.pack(largest, 0, vendor)) == (rollups.SLOT_ROWS if vendor == "postgresql" else 1)
    with pytest.raises(UsageTotalOutOfRange):
        rollups.pack(largest + 1, 0, vendor)


@pytest.mark.django_db
@pytest.mark.commit_mode(ROLLUP_RANGE)
def test_every_slot_full_sums_to_the_largest_total_exactly_and_refuses_any_fact():
    tree({"org": None, "key": "org"})
    org, key = Tenant.objects.get(external_id="org"), Tenant.objects.get(external_id="key")
    largest = rollups.POSTGRES_MAX_UNITS if connection.vendor == "postgresql" else rollups.SQLITE_MAX_UNITS
    for hour in (HOUR - timedelta(hours=1), HOUR):
        for tenant in (org, key):
            UsageRollup.objects.bulk_create(
                UsageRollup(tenant=tenant, feature="llm_tokens", bucket=hour, slot=slot, units=units, events=events)
                for slot, units, events in rollups.pack(largest, 1, connection.vendor)
            )
    assert hour_units("org") == largest and hour_units("key") == largest
    two_hours = (HOUR - timedelta(hours=1), HOUR + timedelta(hours=1))
    assert rollups.sum_units(org.pk, "llm_tokens", *two_hours) == 2 * largest  # past 2**64 and 10**38: exact
    assert get_usage_units(get_context("org"), "llm_tokens", None, None) == 2 * largest
    assert usage_by_tenant_and_feature([org.pk], "day", HOUR)[org.pk]["llm_tokens"] >= units_to_quantity(largest)
    assert sum(daily_usage(org.pk, days=2, now=HOUR).get("llm_tokens", {}).values()) >= units_to_quantity(largest)
    facts = UsageRecord.objects.count()
    for writer_slots in (1, 16, 99):
        with slots(ROLLUP_SLOTS=writer_slots), pytest.raises(UsageTotalOutOfRange):
            record("key", "0.000001", timestamp=HOUR + timedelta(minutes=5))
    assert UsageRecord.objects.count() == facts and hour_units("org") == largest  # nothing half-written
    rows_within_bounds()


@pytest.mark.django_db
@pytest.mark.commit_mode(ROLLUP_SLOTS)
def test_no_sum_of_slots_ever_passes_the_range_whatever_slots_the_writers_fill():
    """Random fills near the bounds, then facts through the recorder with random slot counts: every accepted fact
    adds exactly its units, every refused one adds nothing, and no hour's sum ever passes the largest total (where
    one row would have refused the fact, a slot row always does too)."""
    requires_postgresql()
    tree({"org": None, "key": "org"})
    rng = random.Random(11)
    maximum = 10**18
    for tenant in Tenant.objects.all():
        UsageRollup.objects.bulk_create(
            UsageRollup(
                tenant=tenant,
                feature="llm_tokens",
                bucket=HOUR,
                slot=slot,
                units=(rollups.BASE_UNITS if slot == 0 else rollups.SLOT_UNITS)
                - rng.choice([0, 1, maximum, 3 * maximum]),
                events=0,
            )
            for slot in range(rollups.SLOT_ROWS)
        )
    totals = {tenant_id: hour_units(tenant_id) for tenant_id in ("org", "key")}
    accepted = refused = 0
    for index in range(150):
        units = rng.choice([1, maximum // 2, maximum])
        with slots(ROLLUP_SLOTS=rng.randint(1, 99)):
            try:
                record("key", units_to_quantity(units), timestamp=HOUR + timedelta(seconds=index))
            except UsageTotalOutOfRange:
                refused += 1
                assert {tenant_id: hour_units(tenant_id) for tenant_id in totals} == totals  # nothing added
                continue
        accepted += 1
        for tenant_id in totals:
            totals[tenant_id] += units
            assert hour_units(tenant_id) == totals[tenant_id] <= rollups.POSTGRES_MAX_UNITS
    assert accepted and refused  # both outcomes were exercised
    rows_within_bounds()


# ---- concurrent writers of one tree, in separate processes ----

KEYS = ["p0-k0", "p0-k1", "p1-k0", "p1-k1"]


def one_tree() -> None:
    tree({"org": None, "p0": "org", "p1": "org", "p0-k0": "p0", "p0-k1": "p0", "p1-k0": "p1", "p1-k1": "p1"})


def run_writers(processes: int, facts: int, backdate_hours: int) -> Counter:
    database = dict(connection.settings_dict)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.starmap(
            write, [(database, KEYS, seed, facts, backdate_hours) for seed in range(processes)], chunksize=1
        )
    written: Counter = Counter()
    for result in results:
        written.update(result)
    return written


@pytest.mark.django_db(transaction=True)
@pytest.mark.commit_mode(ROLLUP_SLOTS)
def test_concurrent_writers_of_one_tree_in_separate_processes_keep_rollups_exact():
    requires_postgresql()
    one_tree()
    written = run_writers(processes=6, facts=120, backdate_hours=0)
    assert UsageRecord.objects.count() == 6 * 120
    facts_equal_rollups()
    assert rollups.reconcile_tree(Tenant.objects.get(external_id="org"), repair=False) == []
    for key in KEYS:
        assert get_usage_units(get_context(key), "llm_tokens", None, None) == written[key]
    assert get_usage_units(get_context("org"), "llm_tokens", None, None) == sum(written.values())
    org_slots = UsageRollup.objects.filter(tenant__external_id="org").values("bucket").annotate(n=Count("id"))
    assert max(row["n"] for row in org_slots) > 1  # the writers really spread over slots
    rows_within_bounds()


@pytest.mark.django_db(transaction=True)
@pytest.mark.commit_mode(ROLLUP_SLOTS)
def test_the_fold_is_exact_and_idempotent_beside_concurrent_writers():
    """Writers (a quarter of their facts backdated into hours being folded) run while the fold runs in a loop over
    every hour, the current one included; then the fold leaves one row per hour and changes no sum."""
    requires_postgresql()
    one_tree()
    stop = threading.Event()
    reports: list[rollups.FoldReport] = []
    errors: list[BaseException] = []

    def folder() -> None:
        try:
            while not stop.is_set():
                reports.append(rollups.fold(floor_hour(datetime.now(UTC)) + timedelta(hours=1)))
        except BaseException as error:  # surfaced below
            errors.append(error)
        finally:
            from django.db import connections

            connections.close_all()

    folding = threading.Thread(target=folder)
    folding.start()
    try:
        written = run_writers(processes=5, facts=120, backdate_hours=3)
    finally:
        stop.set()
        folding.join()
    assert not errors, errors
    assert sum(report.rows_folded for report in reports) > 0  # it folded while they wrote
    facts_equal_rollups()
    end = floor_hour(datetime.now(UTC)) + timedelta(hours=1)
    first = rollups.fold(end)
    again = rollups.fold(end)
    assert again.rows_folded == 0 and again.rows_left == 0  # idempotent: nothing left to fold
    assert first.rows_left == 0
    per_hour = UsageRollup.objects.values("tenant", "bucket").annotate(n=Count("id"), top=Max("slot"))
    assert {(row["n"], row["top"]) for row in per_hour} == {(1, 0)}  # one row per hour, slot 0
    facts_equal_rollups()
    assert rollups.reconcile_tree(Tenant.objects.get(external_id="org"), repair=False) == []
    for key in KEYS:
        assert get_usage_units(get_context(key), "llm_tokens", None, None) == written[key]


@pytest.mark.django_db
def test_the_fold_leaves_an_hour_split_when_slot_0_would_pass_its_bound():
    requires_postgresql()
    tree({"org": None})
    org = Tenant.objects.get(external_id="org")
    UsageRollup.objects.create(tenant=org, feature="llm_tokens", bucket=HOUR, slot=0, units=rollups.BASE_UNITS - 2)
    UsageRollup.objects.create(tenant=org, feature="llm_tokens", bucket=HOUR, slot=3, units=5, events=1)
    UsageRollup.objects.create(tenant=org, feature="other", bucket=HOUR, slot=4, units=5, events=1)
    report = rollups.fold()
    assert (report.rows_folded, report.rows_left) == (1, 1)
    assert hour_units("org") == rollups.BASE_UNITS + 3  # unchanged, still exact
    assert UsageRollup.objects.filter(feature="llm_tokens").count() == 2
    assert UsageRollup.objects.get(feature="other").slot == 0
    assert rollups.fold().rows_folded == 0  # nothing more to do, and no loop over the row left split


@pytest.mark.django_db
def test_the_fold_leaves_the_current_hour_alone_by_default():
    requires_postgresql()
    tree({"org": None})
    now = datetime.now(UTC)
    for index in range(5):
        record("org", 1, timestamp=now - timedelta(seconds=index))
    rows = UsageRollup.objects.count()
    assert rollups.fold().rows_folded == 0 and UsageRollup.objects.count() == rows


# ---- reconcile and moves, with slots ----


@pytest.mark.django_db(transaction=True)
def test_reconcile_compares_and_repairs_the_sum_of_the_slots():
    tree({"org": None, "p": "org", "k": "p"})
    org = Tenant.objects.get(external_id="org")
    for minute in range(6):
        record("k", 2, timestamp=HOUR + timedelta(minutes=minute))  # each its own transaction: several slots
    assert rollups.reconcile_tree(org, repair=False) == []
    row = UsageRollup.objects.filter(tenant=org).order_by("-slot").first()
    UsageRollup.objects.filter(pk=row.pk).update(units=row.units + 1)
    UsageRollup.objects.create(tenant=org, feature="llm_tokens", bucket=HOUR, slot=42, units=0, events=1)
    found = rollups.reconcile_tree(org, repair=True)
    assert [(d.tenant_id, d.stored_units, d.expected_units, d.stored_events, d.expected_events) for d in found] == [
        ("org", 12_000_001, 12_000_000, 7, 6)
    ]
    assert list(UsageRollup.objects.filter(tenant=org).values_list("slot", "units", "events")) == [(0, 12_000_000, 6)]
    assert rollups.reconcile_tree(org, repair=False) == []
    assert hour_units("org") == 12_000_000


@pytest.mark.django_db
def test_a_move_carries_slotted_usage_exactly_and_leaves_no_negative_or_empty_row():
    tree({"a": None, "pa": "a", "ka": "pa", "b": None, "kb": "b"})
    for minute in range(4):
        record("ka", 3, timestamp=HOUR + timedelta(minutes=minute))
        record("pa", 1, timestamp=HOUR + timedelta(minutes=minute))
        record("kb", 5, timestamp=HOUR + timedelta(minutes=minute))
    rollups.fold(HOUR + timedelta(hours=1))  # a's and b's rows folded into slot 0 ...
    for minute in range(3):
        record("ka", 7, timestamp=HOUR + timedelta(minutes=10 + minute))  # ... then more, in other slots
    move_tenant("pa", "b")
    assert hour_units("a") == 0
    assert hour_units("b") == (4 * 5 + 4 * 3 + 4 * 1 + 3 * 7) * 10**6
    assert hour_units("pa") == (4 * 3 + 4 * 1 + 3 * 7) * 10**6
    assert (
        not UsageRollup.objects.filter(units__lt=0).exists() and not UsageRollup.objects.filter(events__lt=0).exists()
    )
    assert not UsageRollup.objects.filter(tenant__external_id="a").exists()  # nothing left of pa's usage in a
    facts_equal_rollups()
    rows_within_bounds()


# ---- the migration ----


@pytest.mark.django_db(transaction=True)
def test_the_migration_keeps_every_hour_and_splits_a_row_past_slot_0s_bound():
    from django.db.migrations.executor import MigrationExecutor

    tree({"org": None})
    org_pk = Tenant.objects.get(external_id="org").pk
    big = rollups.POSTGRES_MAX_UNITS if connection.vendor == "postgresql" else rollups.SQLITE_MAX_UNITS
    before, after = [("xaas_metering", "0006_log_cursor")], [("xaas_metering", "0007_rollup_slots")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    try:
        old = (
            MigrationExecutor(connection).loader.project_state(before[0]).apps.get_model("xaas_metering", "UsageRollup")
        )
        old.objects.create(tenant_id=org_pk, feature="llm_tokens", bucket=HOUR, units=big, events=3)
        old.objects.create(tenant_id=org_pk, feature="llm_tokens", bucket=HOUR + timedelta(hours=1), units=7, events=1)
        executor = MigrationExecutor(connection)
        executor.migrate(after)
        rows = UsageRollup.objects.order_by("bucket", "slot").values_list("bucket", "slot", "units", "events")
        assert sum(units for bucket, _, units, _ in rows if bucket == HOUR) == big
        assert sum(events for bucket, *_, events in rows if bucket == HOUR) == 3
        assert (HOUR + timedelta(hours=1), 0, 7, 1) in list(rows)
        expected_rows = rollups.SLOT_ROWS if connection.vendor == "postgresql" else 1
        assert sum(1 for bucket, *_ in rows if bucket == HOUR) == expected_rows
        rows_within_bounds()
        assert hour_units("org") == big
        # Backwards: slots merge into one row per hour, the sum unchanged.
        UsageRollup.objects.create(
            tenant_id=org_pk, feature="llm_tokens", bucket=HOUR + timedelta(hours=1), slot=9, units=5
        )
        executor = MigrationExecutor(connection)
        executor.migrate(before)
        old = (
            MigrationExecutor(connection).loader.project_state(before[0]).apps.get_model("xaas_metering", "UsageRollup")
        )
        assert sorted(old.objects.values_list("bucket", "units", "events")) == [
            (HOUR, big, 3),
            (HOUR + timedelta(hours=1), 12, 1),
        ]
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())
    assert rollups.sum_units(org_pk, "llm_tokens", None, None) == big + 12


# ---- the command and the beat task ----


@pytest.mark.django_db
def test_the_command_and_the_beat_task_fold_hours_that_are_over():
    import io
    import json

    from django.core.management import call_command

    from metering.tasks import fold_rollups

    tree({"org": None})
    org = Tenant.objects.get(external_id="org")
    for slot in (0, 3, 7):
        UsageRollup.objects.create(tenant=org, feature="llm_tokens", bucket=HOUR, slot=slot, units=slot + 1, events=1)
    UsageRollup.objects.create(tenant=org, feature="llm_tokens", bucket=HOUR - timedelta(hours=5), slot=2, units=9)
    out = io.StringIO()
    call_command("fold_rollups", "--hours-ago", "4", "--json", stdout=out)
    assert json.loads(out.getvalue())["rows_folded"] == 1  # only the hour that ended 4+ hours ago
    assert fold_rollups() == {"trees": 1, "rows_folded": 2, "rows_left": 0}
    assert list(UsageRollup.objects.order_by("bucket").values_list("slot", "units", "events")) == [
        (0, 9, 0),
        (0, 1 + 4 + 8, 3),
    ]
    assert fold_rollups()["rows_folded"] == 0
    with pytest.raises(Exception, match="hours-ago"):
        call_command("fold_rollups", "--hours-ago", "-1")


@pytest.mark.parametrize("value", [0, 100, "16", True, None])
def test_a_bad_slot_count_is_a_system_check_error_and_never_used(value):
    from django.core.exceptions import ImproperlyConfigured

    from metering.checks import check_metering_settings

    with slots(ROLLUP_SLOTS=value):
        assert "xaas_metering.E036" in {message.id for message in check_metering_settings()}
        with pytest.raises(ImproperlyConfigured):
            rollups.writer_slots()
    with slots(ROLLUP_SLOTS=99):
        assert "xaas_metering.E036" not in {message.id for message in check_metering_settings()}
