"""Admin pages stay small and fast when one tenant has thousands of features (issue 10, item 4).

After one tenant recorded 5,000 distinct features its admin page was 32 MB and took 7.6 s. Every admin page of that
tenant (the tree, its own page and its ancestors', quotas, facts, rollups, outbox) must stay under 300 KB, cost a
bounded number of queries and render in well under a second.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from metering.events import utcnow
from metering.models import UsageOutbox, UsageRecord, UsageRollup
from quotas.models import QuotaLimit
from tenants.models import Tenant
from tests.admin_fixtures import build_forest, staff_user, superuser
from tests.quotas.test_admin_scope import login, url

pytestmark = pytest.mark.django_db

FEATURES = 5_000
MAX_BYTES = 300_000
MAX_QUERIES = 40
# Bytes and queries are the bounds that do not depend on the machine; the time bound only catches a page that does
# per-feature work in Python (seconds at 5,000 features). 1 s failed under a loaded 2-core CI machine.
MAX_SECONDS = 5.0
HEAVY = "acme-chat-key-1"


@pytest.fixture
def heavy():
    """5,000 features for one tenant, each with a fact, hourly rollups up its lineage, a quota and an outbox row."""
    build_forest()
    tenant = Tenant.objects.get(external_id=HEAVY)
    lineage = list(Tenant.objects.filter(pk__in=tenant.ancestor_pks))
    now = utcnow()
    hour = now.replace(minute=0, second=0, microsecond=0)
    features = [f"feature-{index:05d}" for index in range(FEATURES)]
    records = UsageRecord.objects.bulk_create(
        UsageRecord(tenant=tenant, feature=feature, units=(index + 1) * 10**6, timestamp=now, transaction_id=feature)
        for index, feature in enumerate(features)
    )
    UsageRollup.objects.bulk_create(
        UsageRollup(tenant=level, feature=feature, bucket=bucket, units=(index + 1) * 10**6, events=1)
        for level in lineage
        for index, feature in enumerate(features)
        for bucket in (hour, hour - timedelta(days=3))
    )
    QuotaLimit.objects.bulk_create(
        QuotaLimit(tenant=tenant, feature=feature, limit=Decimal(10**6), period="month") for feature in features
    )
    records = list(UsageRecord.objects.filter(tenant=tenant))
    UsageOutbox.objects.bulk_create(UsageOutbox(record=fact, sink="lago", next_attempt_at=now) for fact in records)
    return tenant


def pages(tenant: Tenant, top: int) -> list[str]:
    """Every admin page of ``tenant``: the tree, its page and its ancestors' (from depth ``top``), quotas, usage."""
    quota = QuotaLimit.objects.filter(tenant=tenant).order_by("pk").first()
    fact = UsageRecord.objects.filter(tenant=tenant).order_by("pk").first()
    rollup = UsageRollup.objects.filter(tenant=tenant).order_by("pk").first()
    parents = tenant.ancestor_pks[top:]
    assert quota and fact and rollup
    return [
        url("tenant", "changelist"),
        url("tenant", "changelist") + f"?q={tenant.external_id}",
        *(url("tenant", "change", pk) for pk in parents),
        url("tenant", "add"),
        url("quotalimit", "changelist"),
        url("quotalimit", "changelist") + f"?q={tenant.external_id}",
        url("quotalimit", "change", quota.pk),
        url("quotalimit", "add"),
        url("usagerecord", "changelist"),
        url("usagerecord", "change", fact.pk),
        url("usagerollup", "changelist"),
        url("usagerollup", "change", rollup.pk),
        url("usageoutbox", "changelist"),
        url("apikey", "add"),
    ]


@pytest.mark.parametrize("who", ["superuser", "scoped"])
def test_every_admin_page_of_a_tenant_with_5000_features_is_small_fast_and_bounded(heavy, who):
    client = login(superuser() if who == "superuser" else staff_user("chat-admin", "acme-chat"))
    client.get("/admin/")  # warm: templates compiled, session loaded
    too_big = {}
    for page in pages(heavy, top=0 if who == "superuser" else 1):
        with CaptureQueriesContext(connection) as queries:
            started = time.perf_counter()
            response = client.get(page)
            elapsed = time.perf_counter() - started
        count = len(queries.captured_queries)
        assert response.status_code == 200, page
        size = len(response.content)
        for _ in range(2):  # the machine is shared: a slow page is timed again, the best time counts
            if elapsed < MAX_SECONDS:
                break
            started = time.perf_counter()
            client.get(page)
            elapsed = min(elapsed, time.perf_counter() - started)
        if size >= MAX_BYTES or count > MAX_QUERIES or elapsed >= MAX_SECONDS:
            too_big[page] = f"{size} bytes, {count} queries, {elapsed:.3f} s"
    assert too_big == {}


def test_the_bounded_pages_say_what_they_leave_out_and_link_to_it(heavy):
    client = login(superuser())
    tree = client.get(url("tenant", "changelist")).content.decode()
    row = tree[tree.index(f'value="{heavy.pk}"') :].split("</tr>")[0]
    # 5 quota bars (the fullest: the most used features) and no plain features (all 5,000 have a quota).
    assert row.count('class="xaas-usage ') == 5 and "feature-04999/month" in row
    assert f"and {FEATURES - 5} more" in row
    page = client.get(url("tenant", "change", heavy.pk)).content.decode()
    drawn = re.findall(r'<figure class="xaas-usage-chart" data-feature="([^"]+)"', page)
    assert drawn == [f"feature-{index:05d}" for index in range(FEATURES - 10, FEATURES)]  # the 10 most used
    assert f"and {FEATURES - 10} more features" in page
    assert 'name="quota_limits-25-feature"' not in page
    assert 'name="quota_limits-24-feature"' in page
    assert f"and {FEATURES - 25} more:" in " ".join(page.split())  # quotas beyond the inline's 25
    link = re.search(r'href="([^"]*tenant__id__exact=\d+)"', page)
    assert link is not None
    listing = client.get(link.group(1).replace("&amp;", "&"))
    assert listing.status_code == 200 and f"{FEATURES} quota limits" in listing.content.decode()
    # The feature filters offer the 20 features with the most rows, not 5,000.
    facts = client.get(url("usagerecord", "changelist")).content.decode()
    assert len(re.findall(r'href="\?feature=feature-\d+"', facts)) == 20
    chosen = client.get(url("usagerecord", "changelist") + "?feature=feature-00007").content.decode()
    results = chosen.split('id="result_list"')[1].split("</table>")[0]
    assert set(re.findall(r"feature-\d+", results)) == {"feature-00007"}
