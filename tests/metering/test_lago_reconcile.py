"""``reconcile_usage --sink lago`` (issue 12 item 6): per subscription x code x day, what was delivered against what
the fake Lago holds (its events list, lago-api ``EventsController#index``, paginated), in both store modes, and
facts Lago accepted but will not bill (outside the subscription's boundaries, ``SubscriptionsController#show``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from io import StringIO

import httpx
import pytest
from django.core.management import CommandError, call_command

from metering.delivery.deliver import flush
from tenants.models import Tenant
from tests.lago_server import FakeLago
from tests.lago_support import API_KEY, lago_metering, record, states

pytest_plugins = ["tests.lago_fixtures"]
pytestmark = pytest.mark.django_db(transaction=True)

DAY1 = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
DAY2 = datetime(2026, 12, 1, 23, 59, 59, tzinfo=UTC)


@pytest.fixture(params=["postgres", "clickhouse"])
def server(request, settings, private_queue):
    with FakeLago(API_KEY, dedupe=request.param) as fake:
        settings.METERING = lago_metering(fake.url, CELERY_QUEUE=private_queue, BATCH_SIZE=100)
        yield fake


def run() -> str:
    out = StringIO()
    call_command("reconcile_usage", "--sink", "lago", stdout=out)
    return out.getvalue()


def deliver_some() -> None:
    for index in range(3):
        record("key1", index + 1, transaction_id=f"a-{index}", timestamp=DAY1 + timedelta(minutes=index))
    record("key2", 5, transaction_id="b-0", timestamp=DAY2)
    record("key2", 2, transaction_id="c-0", timestamp=DAY2, feature="images")
    flush()
    assert states() == {"delivered": 5}


def test_everything_delivered_is_held_no_difference(server, org):
    server.subscriptions["sub-org"] = {"external_id": "sub-org", "started_at": "2026-01-01T00:00:00Z"}
    deliver_some()
    assert run().strip().splitlines() == ["0 differences in 3 subscription x code x days compared"]
    del server.subscriptions["sub-org"]  # Lago does not describe it: said, not guessed
    assert run().strip().splitlines() == [
        "subscription sub-org: Lago did not describe it, billability not checked",
        "0 differences in 3 subscription x code x days compared",
    ]


def test_a_fact_lago_lost_another_event_and_an_unknown_event_are_each_reported(server, org):
    deliver_some()
    with server.lock:
        [lost] = [key for key, event in server.store.items() if event["transaction_id"] == "key1/a-1"]
        del server.store[lost]
        [changed] = [event for event in server.store.values() if event["transaction_id"] == "key2/b-0"]
        changed["properties"] = {"quantity": 6}
    foreign = {
        "transaction_id": "stranger",
        "external_subscription_id": "sub-org",
        "code": "llm_tokens",
        "timestamp": DAY1.timestamp() + 3600,
        "properties": {"quantity": 1},
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.post(server.url + "/api/v1/events/batch", json={"events": [foreign]}, headers=headers).is_success
    text = run()
    assert "sub-org llm_tokens 2026-11-30: delivered 3, Lago holds 3" in text
    assert "  delivered, not in Lago: 1: key1/a-1" in text
    assert "  in Lago, not delivered by us: 1: stranger" in text
    assert "sub-org llm_tokens 2026-12-01: delivered 1, Lago holds 1" in text
    assert "  Lago holds another event under the id: 1: key2/b-0" in text
    assert text.rstrip().endswith("2 differences in 3 subscription x code x days compared")


def test_facts_outside_the_subscription_boundaries_are_accepted_not_billable(server, org):
    server.subscriptions["sub-org"] = {
        "external_id": "sub-org",
        "started_at": "2026-12-01T00:00:00Z",
        "terminated_at": None,
    }
    deliver_some()
    text = run()
    assert "sub-org llm_tokens 2026-11-30: delivered 3, Lago holds 3" in text
    assert "  accepted, not billable (outside the subscription's boundaries): 3: key1/a-0, key1/a-1, key1/a-2" in text
    assert "2026-12-01: delivered 1" not in text  # after started_at: billable


def test_lago_lists_are_read_page_by_page(server, org):
    for index in range(230):
        record("key1", 1, transaction_id=f"p-{index}", timestamp=DAY1 + timedelta(seconds=index))
    for _ in range(3):
        flush()
    assert states() == {"delivered": 230}
    assert run().strip().splitlines()[-1] == "0 differences in 1 subscription x code x days compared"
    listings = [request for request in server.requests if request.path.startswith("/api/v1/events?")]
    assert len(listings) == 3  # 100 + 100 + 30


def test_lago_refusing_the_listing_is_a_command_error_not_a_report(server, org):
    deliver_some()
    server.keys = {}
    with pytest.raises(CommandError, match="Lago could not be read: listing sub-org images: 401"):
        run()


def test_metering_status_warns_before_sending_about_facts_lago_will_not_bill(server, org):
    """Issue 12 item 6: the warning comes *before* the facts leave (pending or held), not after reconciliation."""
    server.subscriptions["sub-org"] = {
        "external_id": "sub-org",
        "started_at": "2026-12-01T00:00:00Z",
        "terminated_at": "2026-12-31T00:00:00Z",
    }
    for index in range(2):
        record("key1", 1, transaction_id=f"early-{index}", timestamp=DAY1)  # before started_at
    record("key1", 1, transaction_id="inside", timestamp=DAY2)
    out = StringIO()
    with pytest.raises(CommandError):  # --check: an alert
        call_command("metering_status", "--check", stdout=out)
    assert (
        "WARNING (not billable): subscription sub-org: 2 dated before it started (2026-12-01 00:00:00Z)"
        in out.getvalue()
    )
    quiet = StringIO()
    call_command("metering_status", "--no-lago", stdout=quiet)  # no call to Lago at all
    assert "not billable" not in quiet.getvalue()
    flush()
    after = StringIO()
    call_command("metering_status", stdout=after)
    assert "not billable" not in after.getvalue()  # nothing waits any more (reconcile_usage reports them now)


def test_metering_status_stays_bounded_when_lago_hangs(server, org, settings):
    """A status probe must answer while Lago hangs: the first request that times out ends the questions (one overall
    deadline too), whatever the number of subscriptions waiting."""
    import time

    from metering.delivery.reconcile_lago import unbillable_before_sending
    from tests.faults import TcpProxy

    Tenant.objects.filter(external_id="other").update(lago_subscription_id="sub-other")
    record("key1", 1, transaction_id="w-1", timestamp=DAY1)
    record("other", 1, transaction_id="w-2", timestamp=DAY1)
    port = int(server.url.rsplit(":", 1)[1])
    with TcpProxy("127.0.0.1", port) as proxy:
        settings.METERING = {
            **settings.METERING,
            "SINK_URL": f"http://127.0.0.1:{proxy.port}",
            "SINK_TIMEOUT_SECONDS": 1,
        }
        proxy.hang()
        started = time.monotonic()
        found, unknown = unbillable_before_sending()
        elapsed = time.monotonic() - started
        proxy.heal()
    assert found == [] and sorted(unknown) == ["sub-org", "sub-other"]
    assert elapsed < 4  # one timed-out request (about 1 s), not one per subscription
