"""What operators use: ``metering_flush`` (progress bar), ``metering_status``, and the outbox admin."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.core.management.base import CommandError

from metering.delivery.deliver import flush
from metering.models import SinkState, UsageOutbox
from tenants.models import Tenant
from tests.lago_support import API_KEY, REFUSAL, REFUSED, record, record_many, states

pytest_plugins = ["tests.lago_fixtures"]
pytestmark = pytest.mark.django_db(transaction=True)


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_metering_flush_delivers_synchronously_with_a_progress_bar(lago_settings, org):
    expected = record_many(25)
    output = run("metering_flush")
    assert "\r[############------------------] 10/25" in output
    assert "\r[##############################] 25/25" in output
    assert output.rstrip().endswith("lago: 25 delivered (0 already there) in 3 requests, 0 dead, 0 held, 0 to retry")
    assert lago_settings.stored_transaction_ids() == dict.fromkeys(expected, 1)
    assert (
        run("metering_flush").strip() == "lago: 0 delivered (0 already there) in 0 requests, 0 dead, 0 held, 0 to retry"
    )


def test_metering_flush_fails_loudly_when_blocked_or_retrying(lago_settings, org):
    record_many(3)
    lago_settings.fail("500")
    with pytest.raises(CommandError, match="transient failure, 3 facts retried") as retrying:
        run("metering_flush", "--no-progress")
    assert retrying.value.returncode == 1
    lago_settings.keys = {}
    record_many(1, prefix="new")
    with pytest.raises(CommandError, match="delivery is blocked: 401") as blocked:
        run("metering_flush", "--no-progress")
    assert blocked.value.returncode == 1
    assert SinkState.objects.get().blocked_status == 401


def test_metering_flush_resume_resend_release_and_purge(lago_settings, org):
    record("key1", 1, transaction_id="bad", feature=REFUSED)
    record("other", 2, transaction_id="held")
    record_many(3)
    assert "3 delivered" in run("metering_flush", "--no-progress")
    assert states() == {"delivered": 3, "dead": 1, "held": 1}
    Tenant.objects.filter(external_id="other").update(lago_subscription_id="sub-other")
    lago_settings.keys = {}
    out = StringIO()
    with pytest.raises(CommandError, match="blocked: 401"):
        call_command("metering_flush", "--release-held", "--resend-dead", "--no-progress", stdout=out)
    assert "1 dead letters queued again" in out.getvalue() and "1 held facts released" in out.getvalue()
    assert states() == {"delivered": 3, "pending": 2}
    lago_settings.keys = {API_KEY: "write"}
    output = run("metering_flush", "--resume", "--no-progress")
    assert "lago: delivery resumed" in output
    # the held fact is delivered; the dead letter was not fixed, so Lago refuses it again
    assert output.rstrip().endswith("1 delivered (0 already there) in 2 requests, 1 dead, 0 held, 0 to retry")
    assert SinkState.objects.get().blocked_at is None
    assert "4 delivered outbox rows purged" in run("metering_flush", "--no-progress", "--purge-delivered-days", "0")
    assert states() == {"dead": 1}


def test_metering_flush_refuses_what_it_cannot_do(lago_settings, settings):
    with pytest.raises(CommandError, match="not the configured one"):
        run("metering_flush", "--sink", "webhook")
    with pytest.raises(CommandError, match="not the configured one"):  # no registry: only the adapter's sink is known
        run("metering_flush", "--sink", "kafka")
    with pytest.raises(CommandError, match="must be positive"):
        run("metering_flush", "--max-batches", "0")
    settings.METERING = {}
    with pytest.raises(CommandError, match="has no outbox"):
        run("metering_flush")


def test_metering_status_shows_backlog_age_dead_letters_and_alerts(lago_settings, org):
    record_many(4)
    text = run("metering_status")
    assert "configured sink: lago" in text
    assert "pending 4 (due now 4), delivered 0, dead 0, held 0" in text
    assert "oldest pending: " in text and "s ago (" in text
    run("metering_status", "--check")  # a backlog alone is not an alert
    record("key1", 1, transaction_id="bad", feature=REFUSED)
    record("other", 1, transaction_id="h")
    flush()
    text = run("metering_status")
    assert "pending 0 (due now 0), delivered 4, dead 1, held 1" in text
    assert "ALERT: 1 dead letters" in text and "ALERT: 1 facts held without a Lago subscription" in text
    assert "held tenants: other" in text
    assert "dead #" in text and f"422 {REFUSAL}" in text
    data = json.loads(run("metering_status", "--json"))
    assert data["configured_sink"] == "lago"
    [lago] = data["sinks"]
    assert lago["counts"] == {"pending": 0, "delivered": 4, "dead": 1, "held": 1}
    assert lago["oldest_pending_age_seconds"] is None
    with pytest.raises(CommandError) as check:
        run("metering_status", "--check")
    assert check.value.returncode == 2


def test_metering_status_without_an_outbox_adapter(settings):
    settings.METERING = {}
    assert run("metering_status").strip() == "configured sink: none (database adapter)"


def test_the_admin_shows_counts_blocks_and_resends(lago_settings, org, admin_client):
    record_many(3)
    record("key1", 1, transaction_id="bad", feature=REFUSED)
    flush()
    lago_settings.keys = {}
    record_many(2, prefix="later")
    flush()
    page = admin_client.get("/admin/xaas_metering/usageoutbox/").content.decode()
    for label in ("pending (2)", "delivered (3)", "dead (rejected) (1)", "held (no subscription) (0)"):
        assert label in page
    assert "Delivery to lago is STOPPED" in page
    assert "expression_evaluation_failed" in page  # the last error column
    dead = UsageOutbox.objects.get(state="dead")
    delivered = UsageOutbox.objects.filter(state="delivered").first()
    response = admin_client.post(
        "/admin/xaas_metering/usageoutbox/",
        {"action": "resend", "_selected_action": [dead.pk, delivered.pk]},
        follow=True,
    )
    assert "1 facts queued again" in response.content.decode()
    assert UsageOutbox.objects.get(pk=dead.pk).state == "pending"
    assert UsageOutbox.objects.get(pk=delivered.pk).state == "delivered"
    sinks = admin_client.get("/admin/xaas_metering/sinkstate/").content.decode()
    assert "401" in sinks
    assert admin_client.get(f"/admin/xaas_metering/usageoutbox/{dead.pk}/change/").status_code == 200


def test_resending_needs_the_change_permission(lago_settings, org, client):
    record("key1", 1, transaction_id="bad", feature=REFUSED)
    flush()
    viewer = User.objects.create_user("viewer", password="pw-viewer-123", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_usageoutbox"))
    client.force_login(viewer)
    page = client.get("/admin/xaas_metering/usageoutbox/").content.decode()
    assert "dead (rejected) (1)" in page
    assert 'value="resend"' not in page
    dead = UsageOutbox.objects.get(state="dead")
    client.post("/admin/xaas_metering/usageoutbox/", {"action": "resend", "_selected_action": [dead.pk]})
    assert UsageOutbox.objects.get(pk=dead.pk).state == "dead"
