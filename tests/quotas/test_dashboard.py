"""The operator's dashboard (``quotas.dashboard``) through the admin, with real data: quotas near their limits, the
top consumers, refusals counted where they are decided, and the outbox per sink — for a superuser, for a scoped
tenant administrator (its subtree only), and refused to staff without the quota view permission."""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from metering import log
from metering.events import utcnow
from metering.models import UsageOutbox, UsageRecord
from quotas import refusals
from quotas.exceptions import QuotaExceeded
from quotas.handler import QuotaPolicyHandler
from quotas.models import QuotaRefusalCount
from tenants.models import Tenant
from tests.admin_fixtures import build_forest, staff_user, superuser
from tests.factories import record
from tests.quota_helpers import limit

pytestmark = pytest.mark.django_db
DASHBOARD = "/admin/xaas_quotas/quotalimit/dashboard/"


def login(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def tenant_url(tenant_id: str) -> str:
    return reverse("admin:xaas_tenants_tenant_change", args=[Tenant.objects.get(external_id=tenant_id).pk])


def section(html: str, name: str) -> str:
    start = html.index(f'<section id="xaas-{name}"')
    return html[start : html.index("</section>", start)]


def rows(html: str, kind: str, *fields: str) -> list[tuple[str, ...]]:
    found = []
    for tag in re.findall(rf'<tr class="xaas-{kind}-row"[^>]*>', html):
        attrs = dict(re.findall(r'data-([\w-]+)="([^"]*)"', tag))
        found.append(tuple(attrs[name] for name in fields))
    return found


def refuse(tenant_id: str, feature: str = "llm_tokens", times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(QuotaExceeded):
            QuotaPolicyHandler(tenant_id).consume(feature, 1_000_000)


@pytest.fixture
def forest():
    build_forest()
    record("acme-chat-key-1", 900)
    record("acme-chat-key-2", 50)
    record("acme-chat", 7)  # acme-chat's own usage
    record("acme-search-key-1", 300)
    record("other-project", 1000, feature="api_calls")
    limit("acme-chat", 1000)  # 957 of 1000: warn, hard
    limit("acme-search", 300, period="day")  # 300 of 300: refused
    limit("other", 100, feature="api_calls", enforcement="soft")  # 1000 of 100, soft: recorded beyond
    limit("acme", 10_000)  # 1257 of 10000: ok


def test_the_index_links_the_dashboard_and_a_superuser_sees_every_section(forest):
    client = login(superuser())
    assert DASHBOARD in client.get("/admin/").content.decode()
    html = client.get(DASHBOARD).content.decode()

    # Nearest their limits: hard quotas first (fullest first), then soft; each bar with the right level.
    nearest = section(html, "nearest")
    assert rows(nearest, "near", "tenant", "period", "enforcement") == [
        ("acme-search", "day", "hard"),
        ("acme-chat", "month", "hard"),
        ("acme", "month", "hard"),
        ("other", "month", "soft"),
    ]
    levels = re.findall(r'data-level="(\w+)" data-enforcement="(\w+)"', nearest)
    assert levels == [("over", "hard"), ("warn", "hard"), ("ok", "hard"), ("beyond", "soft")]
    assert "refused" in nearest and "over soft limit" in nearest
    assert f'href="{tenant_url("acme-search")}"' in nearest

    # Top consumers today, by own usage (a parent's subtree usage is not counted as its own).
    consumers = section(html, "consumers")
    llm = consumers[consumers.index('data-feature="llm_tokens"') :]
    llm = llm[: llm.index("</table>")]
    assert rows(llm, "consumer", "tenant", "used") == [
        ("acme-chat-key-1", "900"),
        ("acme-search-key-1", "300"),
        ("acme-chat-key-2", "50"),
        ("acme-chat", "7"),
    ]
    assert f'href="{tenant_url("acme-chat-key-1")}"' in llm
    assert rows(consumers, "consumer", "tenant")[0] == ("other-project",)  # api_calls, the first feature

    # No refusal yet; no outbox (the database adapter is configured).
    assert "No refusal in the last 24 hours." in section(html, "refusals")
    assert "Only the Lago and webhook adapters use the outbox" in section(html, "outbox")


def stored_counts() -> dict[tuple[str, str], int]:
    """Refusals counted in the last day, wherever they were stored (Redis with a Redis cache, else the database)."""
    names = dict(Tenant.objects.values_list("pk", "external_id"))
    counts: dict[tuple[str, str], int] = {}
    for tenant_pk, feature, _, count in refusals.refusals_since(None, utcnow() - timedelta(days=1)):
        counts[(names[tenant_pk], feature)] = counts.get((names[tenant_pk], feature), 0) + count
    return counts


@pytest.fixture
def database_counts(monkeypatch):
    """The database's own path (the one without Redis, and Redis's fallback), whatever the configuration."""
    monkeypatch.setattr(refusals, "_count_in_redis", lambda *args: False)


def test_refusals_are_counted_where_they_are_decided_and_shown_per_hour(forest):
    refuse("acme-search-key-1", times=3)  # blocked by acme-search's day quota
    refuse("acme-chat-key-2", times=2)  # blocked by acme-chat's month quota
    with pytest.raises(QuotaExceeded):
        QuotaPolicyHandler("acme-chat-key-1").check("llm_tokens", 1_000_000, raise_exception=True)
    assert QuotaPolicyHandler("acme-chat-key-1").check("llm_tokens", 1_000_000).allowed is False  # not raised: no count
    counts = stored_counts()
    # Log mode's check() sends quota_exceeded (and so counts) even when it does not raise (README, dashboard).
    assert counts == {
        ("acme-search-key-1", "llm_tokens"): 3,
        ("acme-chat-key-2", "llm_tokens"): 2,
        ("acme-chat-key-1", "llm_tokens"): 2 if log.is_log_mode() else 1,
    }
    # Two hours ago, and beyond the last 24 hours (not shown).
    key = Tenant.objects.get(external_id="other-project")
    now = utcnow()
    QuotaRefusalCount.objects.create(
        tenant=key, feature="api_calls", hour=refusals.hour_of(now) - timedelta(hours=2), count=4
    )
    QuotaRefusalCount.objects.create(
        tenant=key, feature="api_calls", hour=refusals.hour_of(now) - timedelta(hours=24), count=99
    )

    html = section(login(superuser()).get(DASHBOARD).content.decode(), "refusals")
    hours = re.findall(r'data-hour="[^"]+" data-count="(\d+)"', html)
    assert len(hours) == 24
    checked = counts[("acme-chat-key-1", "llm_tokens")]
    assert hours[-1] == str(5 + checked) and hours[-3] == "4" and sum(map(int, hours)) == 9 + checked
    assert f"({9 + checked})" in html
    refused = rows(html, "refused", "tenant", "feature", "count")
    assert refused[:2] == [("other-project", "api_calls", "4"), ("acme-search-key-1", "llm_tokens", "3")]
    assert sorted(refused[2:]) == sorted(
        [("acme-chat-key-2", "llm_tokens", "2"), ("acme-chat-key-1", "llm_tokens", str(checked))]
    )  # most refused first (a tie in log mode, where check() counts too)
    assert [int(count) for *_, count in refused] == sorted((int(count) for *_, count in refused), reverse=True)
    assert f'href="{tenant_url("acme-search-key-1")}"' in html


def test_a_refusal_is_still_answered_when_its_count_cannot_be_stored(forest, caplog, monkeypatch, database_counts):
    def broken(*args: object) -> None:
        raise RuntimeError("store down")

    monkeypatch.setattr(refusals, "_increment", broken)
    caplog.set_level(logging.WARNING, logger="quotas")
    refuse("acme-search-key-1")
    assert "refusal of acme-search-key-1 for llm_tokens not counted" in caplog.text
    assert QuotaRefusalCount.objects.count() == 0


def test_a_refusal_count_that_fails_in_the_callers_transaction_leaves_it_usable(forest, database_counts):
    from django.db import transaction

    with transaction.atomic():
        QuotaRefusalCount.objects.all().delete()
        with connection.cursor() as cursor:  # the store is gone (as if the migration were missing)
            cursor.execute(f"ALTER TABLE {QuotaRefusalCount._meta.db_table} RENAME TO xaas_gone")
        refuse("acme-search-key-1")
        record("acme-chat-key-2", 1)  # the caller's transaction still works after the failed count
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE xaas_gone RENAME TO {QuotaRefusalCount._meta.db_table}")
    assert QuotaRefusalCount.objects.count() == 0


def test_the_outbox_section_counts_pending_due_held_dead_and_the_oldest_age(forest):
    now = utcnow()
    facts = list(UsageRecord.objects.order_by("pk"))
    states = [
        ("lago", "pending", now - timedelta(minutes=1)),  # due
        ("lago", "pending", now + timedelta(minutes=5)),  # not due yet (a retry's backoff or a claim's lease)
        ("lago", "held", now),
        ("webhook", "dead", now),
        ("webhook", "delivered", now),
    ]
    for fact, (sink, state, due) in zip(facts, states, strict=True):
        UsageOutbox.objects.create(record=fact, sink=sink, state=state, next_attempt_at=due)
    UsageOutbox.objects.filter(sink="lago", state="pending").update(created_at=now - timedelta(hours=3, minutes=5))
    html = section(login(superuser()).get(DASHBOARD).content.decode(), "outbox")
    assert rows(html, "sink", "sink", "pending", "due", "held", "dead") == [
        ("lago", "2", "1", "1", "0"),
        ("webhook", "0", "0", "0", "1"),
    ]
    assert "3 h 05 min" in html or "3 h 04 min" in html
    assert "/admin/xaas_metering/usageoutbox/?sink=lago" in html


def test_a_scoped_administrator_sees_only_its_subtree(forest):
    refuse("acme-search-key-1")
    refuse("acme-chat-key-2")
    facts = UsageRecord.objects.select_related("tenant")
    for fact in facts:
        UsageOutbox.objects.create(record=fact, sink="lago", next_attempt_at=utcnow())
    html = login(staff_user("chat-admin", "acme-chat")).get(DASHBOARD).content.decode()
    assert "for the subtree of <strong>acme-chat</strong>" in html
    assert rows(section(html, "nearest"), "near", "tenant") == [("acme-chat",)]
    assert {row[0] for row in rows(section(html, "consumers"), "consumer", "tenant")} == {
        "acme-chat-key-1",
        "acme-chat-key-2",
        "acme-chat",
    }
    assert rows(section(html, "refusals"), "refused", "tenant") == [("acme-chat-key-2",)]
    inside = facts.filter(tenant__path__startswith=Tenant.objects.get(external_id="acme-chat").path).count()
    assert rows(section(html, "outbox"), "sink", "pending") == [(str(inside),)]
    for outside in ("acme-search", "other-project", "acme-search-key-1"):
        assert f">{outside}<" not in html


def test_staff_without_the_quota_view_permission_is_refused(forest):
    client = login(staff_user("nobody", permissions=False))
    assert client.get(DASHBOARD).status_code == 403
    assert DASHBOARD not in client.get("/admin/").content.decode()
    assert Client().get(DASHBOARD).status_code == 302  # anonymous: to the login page


def test_the_dashboard_costs_a_constant_number_of_queries(forest):
    client = login(superuser())
    limit("acme-chat-key-1", 10_000, period="hour")  # every period present from the start: one query each
    limit("acme-chat-key-2", 10_000, period="total")

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert client.get(DASHBOARD).status_code == 200
        return len(captured)

    few = queries()
    from tenants.tree import create_tenant

    for index in range(30):
        create_tenant(f"t-{index}", parent="acme-chat")
        limit(f"t-{index}", 100, period=["hour", "day", "month", "total"][index % 4])
        record(f"t-{index}", 1)
    refuse("t-0")
    assert queries() == few


def test_the_period_switch_and_bad_input(forest):
    client = login(superuser())
    assert 'class="current" aria-current="true">this hour' in client.get(DASHBOARD + "?period=hour").content.decode()
    response = client.get(DASHBOARD + "?period=%00year")
    assert response.status_code == 200
    assert 'class="current" aria-current="true">today' in response.content.decode()


# ---- the admin polish: bar levels, the thresholds field ----


@pytest.mark.parametrize(
    ("used", "limit_", "enforcement", "level"),
    [
        ("1518", "1520", "hard", "warn"),  # room for 2 more: near
        ("1519.5", "1520", "hard", "over"),  # no room for one more unit: refused, though it rounds to 100 %
        ("1520", "1520", "hard", "over"),
        ("0", "0", "hard", "over"),  # a limit of 0 blocks everything
        ("1519.5", "1520", "soft", "warn"),  # a soft quota never refuses
        ("1520", "1520", "soft", "beyond"),
        ("10", "1520", "soft", "ok"),
    ],
)
def test_a_bar_is_red_exactly_when_its_quota_refuses_the_next_unit(used, limit_, enforcement, level):
    from quotas.display import COLOURS, QuotaUsage, usage_bar

    usage = QuotaUsage("llm_tokens", "day", Decimal(used), Decimal(limit_), (80, 100), hard=enforcement == "hard")
    assert usage.level == level
    html = usage_bar(usage)
    assert f'data-level="{level}" data-enforcement="{enforcement}"' in html
    assert f"background:{COLOURS[level]}" in html
    assert ("border:1px dashed" in html) == (enforcement == "soft")
    assert ("refused" in html) == (level == "over")


@pytest.mark.parametrize(
    ("typed", "stored"),
    [("80, 100", [80, 100]), ("100,80,80", [80, 100]), ("", []), ("  5 ", [5]), ("1", [1]), ("[80, 100]", [80, 100])],
)
def test_thresholds_are_typed_as_comma_separated_percentages(typed, stored):
    from quotas.forms import ThresholdsField

    assert ThresholdsField().clean(typed) == stored
    assert ThresholdsField().prepare_value(stored) == ", ".join(map(str, stored))


@pytest.mark.parametrize(
    "typed",
    [
        "[80, [100]]",
        "{}",
        "80;100",
        "0",
        "101",
        "8 0",
        "٨٠",
        "1_0",
        "80,",
        "-5",
        "80.5",
        "\x00",
        "1e2",
        ",".join(["5"] * 11),
    ],
)
def test_bad_thresholds_are_a_form_error_naming_the_item(typed):
    from django.core.exceptions import ValidationError

    from quotas.forms import ThresholdsField

    with pytest.raises(ValidationError):
        ThresholdsField().clean(typed)


def test_the_tenant_page_takes_thresholds_as_text_and_refuses_bad_ones(forest):
    from quotas.models import QuotaLimit

    quota = QuotaLimit.objects.get(tenant__external_id="acme-chat")
    client = login(superuser())
    page = client.get(tenant_url("acme-chat")).content.decode()
    assert re.search(r'<input type="text" name="quota_limits-0-warning_thresholds" value="80, 100"', page)
    tenant = Tenant.objects.get(external_id="acme-chat")
    form = {
        "external_id": "acme-chat",
        "name": tenant.name,
        "kind": tenant.kind,
        "parent": str(tenant.parent_id),
        "is_active": "on",
        "metadata": "{}",
        "quota_limits-TOTAL_FORMS": "1",
        "quota_limits-INITIAL_FORMS": "1",
        "quota_limits-MIN_NUM_FORMS": "0",
        "quota_limits-0-id": str(quota.pk),
        "quota_limits-0-tenant": str(tenant.pk),
        "quota_limits-0-feature": "llm_tokens",
        "quota_limits-0-period": "month",
        "quota_limits-0-limit": "1000",
        "quota_limits-0-enforcement": "hard",
        "quota_limits-0-is_active": "on",
        "api_keys-TOTAL_FORMS": "0",
        "api_keys-INITIAL_FORMS": "0",
        "api_keys-MIN_NUM_FORMS": "0",
        "_continue": "1",
    }
    bad = client.post(tenant_url("acme-chat"), {**form, "quota_limits-0-warning_thresholds": "50, 150"})
    assert bad.status_code == 200 and "&#x27;150&#x27; is not a whole percentage from 1 to 100." in bad.content.decode()
    quota.refresh_from_db()
    assert quota.warning_thresholds == [80, 100]
    good = client.post(tenant_url("acme-chat"), {**form, "quota_limits-0-warning_thresholds": "90, 50"})
    assert good.status_code == 302, good.content.decode()[:2000]
    quota.refresh_from_db()
    assert quota.warning_thresholds == [50, 90]


@pytest.mark.parametrize("model", ["usageoutbox", "sinkstate"])
def test_an_empty_outbox_or_sink_list_says_only_the_lago_and_webhook_adapters_use_it(forest, model):
    client = login(superuser())
    changelist = reverse(f"admin:xaas_metering_{model}_changelist")
    note = "Only the Lago and webhook adapters use the outbox and the delivery sinks"
    assert note in client.get(changelist).content.decode()
    if model == "usageoutbox":
        UsageOutbox.objects.create(record=UsageRecord.objects.earliest("pk"), sink="lago", next_attempt_at=utcnow())
        assert note not in client.get(changelist).content.decode()


def test_old_refusal_counts_are_pruned(forest):
    from quotas.tasks import prune_refusals_task

    key = Tenant.objects.get(external_id="other-project")
    now = utcnow()
    for hours in (0, 24, 7 * 24, 7 * 24 + 1, 30 * 24):
        QuotaRefusalCount.objects.create(
            tenant=key, feature="api_calls", hour=refusals.hour_of(now) - timedelta(hours=hours), count=1
        )
    assert prune_refusals_task() == 2  # older than 7 days (the hour 7 days ago is kept)
    assert QuotaRefusalCount.objects.count() == 3


@pytest.mark.django_db(transaction=True)
def test_refusals_outside_any_transaction_are_counted_in_their_own(forest, database_counts):
    """Autocommit, as in a view without ATOMIC_REQUESTS: the count commits in a transaction of its own (on PostgreSQL
    without waiting for its WAL flush), and exactly once per refusal."""
    refuse("acme-search-key-1", times=4)
    assert list(QuotaRefusalCount.objects.values_list("tenant__external_id", "feature", "count")) == [
        ("acme-search-key-1", "llm_tokens", 4)
    ]
    # The connection is back in autocommit with the default durability for whatever the caller writes next.
    assert connection.get_autocommit()
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            assert cursor.fetchone()[0] == "on"


def test_hours_are_utc_hours_whatever_the_time_zone(forest, settings):
    settings.TIME_ZONE = "Asia/Kolkata"  # +05:30: a local label would be off by half an hour
    refuse("acme-search-key-1")
    html = section(login(superuser()).get(DASHBOARD).content.decode(), "refusals")
    last = re.findall(r'data-hour="([^"]+)" data-count="(\d+)"', html)[-1]
    assert last == (refusals.hour_of(utcnow()).isoformat(), "1")


def test_with_redis_a_refusal_costs_no_sql_and_is_shown(forest, redis_cache, django_assert_num_queries):
    """A flood of refused requests never queues on a database row: Redis counts them (HINCRBY), the dashboard reads
    Redis and the database together."""
    from quotas.exceptions import QuotaExceeded as Refused
    from tenants.lineage import get_context

    context = get_context("acme-search-key-1")
    error = Refused(
        tenant_id="acme-search",
        feature="llm_tokens",
        limit=Decimal(1),
        used=Decimal(1),
        requested=Decimal(1),
        period="day",
        reset_at=None,
    )
    with django_assert_num_queries(0):
        for _ in range(5):
            refusals.count_refusal(context, error)
    assert QuotaRefusalCount.objects.count() == 0
    QuotaRefusalCount.objects.create(
        tenant=Tenant.objects.get(external_id="acme-search-key-1"),
        feature="llm_tokens",
        hour=refusals.hour_of(utcnow()),
        count=2,
    )  # counted by the database while Redis was down
    assert stored_counts()[("acme-search-key-1", "llm_tokens")] == 7
    html = section(login(superuser()).get(DASHBOARD).content.decode(), "refusals")
    assert re.findall(r'data-hour="[^"]+" data-count="(\d+)"', html)[-1] == "7"
