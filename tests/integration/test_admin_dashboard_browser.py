"""Issue 14 item 7 in a real headless Chromium (the fixtures of ``test_admin_browser``): the landing page, the
operator's dashboard, the tenant page at 1280 px with no horizontal overflow, the outbox and API-key lists unclipped,
and a scoped administrator's view-only limit drawn as text. Screenshots go to ``$TEST_ARTIFACTS_DIR``."""

from __future__ import annotations

from typing import Any

import pytest

from metering.events import utcnow
from metering.models import UsageOutbox, UsageRecord
from quotas.exceptions import QuotaExceeded
from quotas.handler import QuotaPolicyHandler
from tenants.apikeys import create_api_key
from tenants.models import ApiKey
from tests.admin_fixtures import staff_user, superuser
from tests.integration import test_admin_browser as browser
from tests.integration.test_admin_browser import GREEN, RED, assert_everything_was_served_locally, log_in, shoot
from tests.quota_helpers import limit

# test_admin_browser's fixtures: a Chromium page on the live server, what it requested, and a forest with usage.
page, traffic, usage_history = browser.page, browser.traffic, browser.usage_history

NARROW = {"width": 1280, "height": 900}


def overflow(tab: Any) -> dict[str, int]:
    return tab.evaluate(
        "() => ({scroll: document.documentElement.scrollWidth, client: document.documentElement.clientWidth})"
    )


def clipped_cells(tab: Any, table: str) -> list[str]:
    """Cells of ``table`` whose content is cut off (wider than the cell) or that lie outside the viewport."""
    return tab.evaluate(
        """selector => {
            const width = document.documentElement.clientWidth;
            return [...document.querySelectorAll(selector + ' th, ' + selector + ' td')]
                .filter(cell => cell.scrollWidth > cell.clientWidth + 1 || cell.getBoundingClientRect().right > width)
                .map(cell => cell.className + ': ' + cell.innerText.slice(0, 40));
        }""",
        table,
    )


def hidden_columns(tab: Any) -> dict[str, float]:
    """How far the change list's table runs past its scrolling box (cut-off columns): 0 when it fits."""
    return tab.evaluate(
        """() => {
            const box = document.querySelector('#changelist .results'), table = document.querySelector('#result_list');
            return {past: table.getBoundingClientRect().right - box.getBoundingClientRect().right,
                    scroll: box.scrollWidth - box.clientWidth};
        }"""
    )


def clipped_inputs(tab: Any, table: str) -> list[str]:
    """Text inputs whose value does not fit, and selects narrower than their chosen option's text."""
    return tab.evaluate(
        """selector => {
            const canvas = document.createElement('canvas').getContext('2d');
            const clipped = [];
            for (const input of document.querySelectorAll(selector + ' input[type=text]')) {
                if (input.offsetParent === null) continue;
                if (input.scrollWidth > input.clientWidth + 1) clipped.push(input.name + ': ' + input.value);
            }
            for (const select of document.querySelectorAll(selector + ' select')) {
                if (select.offsetParent === null) continue;  // the hidden row "Add another" copies
                const style = getComputedStyle(select);
                canvas.font = style.font;
                const text = select.options[select.selectedIndex].text;
                const room = select.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight) - 16;
                if (canvas.measureText(text).width > room) clipped.push(select.name + ': ' + text);
            }
            return clipped;
        }""",
        table,
    )


@pytest.fixture
def busy(usage_history):
    """usage_history's forest and usage, with a quota that refuses, a soft one past its limit and refusals."""
    limit("acme-search", 0, period="day")  # blocks everything: refused
    limit("other", 50, period="day", enforcement="soft")  # 99 of 50: recorded beyond a soft limit
    for _ in range(3):
        with pytest.raises(QuotaExceeded):
            QuotaPolicyHandler("acme-search-key-1").consume("llm_tokens", 1)
    now = utcnow()
    for fact in UsageRecord.objects.filter(tenant__external_id="acme-chat-key-2")[:4]:
        UsageOutbox.objects.create(record=fact, sink="lago", next_attempt_at=now)
    return usage_history


def test_the_landing_page_links_the_admin_the_dashboard_and_the_api_docs(page, traffic, live_server, transactional_db):
    base = live_server.url
    page.set_viewport_size(NARROW)
    page.goto(f"{base}/")
    assert page.locator("h1").inner_text() == "XaaS metering & quotas"
    links = page.locator("ul.links a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert links == ["/admin/", "/admin/xaas_quotas/quotalimit/dashboard/", "/api/docs/"]
    assert overflow(page)["scroll"] <= overflow(page)["client"]
    shoot(page, "10-landing")
    assert_everything_was_served_locally(traffic, base)


def test_the_dashboard_in_a_browser(page, traffic, live_server, busy):
    base = live_server.url
    superuser("operator")
    page.set_viewport_size(NARROW)
    log_in(page, base, "operator", "/admin/")
    page.click("text=Operator's dashboard")
    page.wait_for_selector("#xaas-nearest")
    near = page.locator("#xaas-nearest tr.xaas-near-row")
    assert near.first.get_attribute("data-tenant") == "acme-search"  # hard and refusing: first
    fill = "e => getComputedStyle(e).backgroundColor"
    first_bar = near.first.locator(".xaas-usage")
    assert first_bar.get_attribute("data-level") == "over"
    assert first_bar.locator(".xaas-usage-fill").evaluate(fill) == RED
    assert "refused" in first_bar.inner_text()
    soft = page.locator("#xaas-nearest tr.xaas-near-row[data-enforcement=soft] .xaas-usage")
    assert soft.get_attribute("data-level") == "beyond" and "soft" in soft.inner_text()
    assert soft.locator("[role=meter]").evaluate("e => getComputedStyle(e).borderTopStyle") == "dashed"
    chat = page.locator("#xaas-nearest tr.xaas-near-row[data-tenant=acme-chat] .xaas-usage-fill")
    assert chat.evaluate(fill) == GREEN  # 1500 of 2000 today
    # Refusals: three in the current hour, drawn as the tallest (and only) bar.
    hours = page.locator(".xaas-hour")
    assert hours.count() == 24
    assert hours.last.get_attribute("data-count") == "3"
    last = hours.last.locator(".xaas-hour-bar").bounding_box()
    assert last is not None and last["height"] > 50
    assert page.locator("tr.xaas-refused-row").first.get_attribute("data-tenant") == "acme-search-key-1"
    # Top consumers and the outbox.
    assert (
        page.locator("table.xaas-consumers[data-feature=llm_tokens] tr.xaas-consumer-row").first.get_attribute(
            "data-tenant"
        )
        == "acme-chat-key-1"
    )
    sink = page.locator("tr.xaas-sink-row[data-sink=lago]")
    assert (sink.get_attribute("data-pending"), sink.get_attribute("data-due")) == ("4", "4")
    size = overflow(page)
    assert size["scroll"] <= size["client"], size
    shoot(page, "11-dashboard")
    # Each row leads to the tenant's page.
    page.locator("tr.xaas-refused-row a").first.click()
    page.wait_for_selector("#quota_limits-group")
    assert page.locator(".breadcrumbs").inner_text().endswith("acme-search-key-1")
    assert_everything_was_served_locally(traffic, base)


def test_the_tenant_page_fits_1280_px_and_the_lists_are_not_clipped(page, traffic, live_server, busy):
    base = live_server.url
    superuser("operator")
    for index in range(3):  # every column filled: dates in all of them
        key, _ = create_api_key("acme-chat", name=f"a fairly long key description number {index}")
    ApiKey.objects.filter(pk=key.pk).update(expires_at=utcnow(), revoked_at=utcnow(), last_used_at=utcnow())
    UsageOutbox.objects.filter(pk=UsageOutbox.objects.earliest("pk").pk).update(
        state="dead", delivered_at=utcnow(), last_error="HTTP 422 from the sink: " + "an unknown metric code " * 8
    )
    limit("acme-chat", 5, feature="api_calls", period="hour", warning_thresholds=[50, 75, 90, 100])
    page.set_viewport_size(NARROW)
    log_in(page, base, "operator", "/admin/xaas_tenants/tenant/")
    page.click(".xaas-tree-node:text-is('└ acme-chat')")
    page.wait_for_selector("#quota_limits-group")
    size = overflow(page)
    shoot(page, "12-tenant-1280")
    assert size["scroll"] <= size["client"], size
    assert clipped_cells(page, "#quota_limits-group table") == []
    assert clipped_inputs(page, "#quota_limits-group table") == []
    thresholds = page.locator("input[name='quota_limits-0-warning_thresholds']")
    assert thresholds.input_value() == "50, 75, 90, 100"

    for name, changelist in (
        ("13-outbox-1280", "xaas_metering/usageoutbox"),
        ("14-apikeys-1280", "xaas_tenants/apikey"),
        ("14b-quotas-1280", "xaas_quotas/quotalimit"),
    ):
        page.goto(f"{base}/admin/{changelist}/")
        page.wait_for_selector("#result_list")
        shoot(page, name)
        size = overflow(page)
        assert size["scroll"] <= size["client"], (changelist, size)
        assert clipped_cells(page, "#result_list") == [], changelist
        hidden = hidden_columns(page)
        assert hidden["past"] <= 1 and hidden["scroll"] <= 1, (changelist, hidden)
    # No sink has reported yet: the empty list says who uses it.
    page.goto(f"{base}/admin/xaas_metering/sinkstate/")
    assert "Only the Lago and webhook adapters use" in page.locator(".xaas-empty-note").inner_text()
    shoot(page, "14c-sinks-empty")
    assert_everything_was_served_locally(traffic, base)


def test_a_scoped_administrator_reads_its_own_limits_as_text(page, traffic, live_server, busy):
    base = live_server.url
    staff_user("chat-admin", "acme-chat")
    page.set_viewport_size(NARROW)
    log_in(page, base, "chat-admin", "/admin/xaas_quotas/quotalimit/")
    own = page.locator("#result_list .xaas-readonly[data-field$='-limit']")
    assert own.count() == 1 and own.inner_text() == "2000"
    assert own.evaluate("e => e.tagName") == "SPAN"
    row = page.locator("#result_list tr", has=own)
    assert row.locator("input:not([type=hidden]):not([type=checkbox]), select").count() == 0
    shoot(page, "15-scoped-quota-list")

    page.goto(f"{base}/admin/xaas_tenants/tenant/")
    page.click(".xaas-tree-node:text-is('acme-chat')")
    page.wait_for_selector("#quota_limits-group")
    cell = page.locator("#quota_limits-group td.field-limit_value").first
    assert cell.inner_text().strip() == "2,000"
    assert cell.locator("input").count() == 0
    thresholds = page.locator("#quota_limits-group td.field-thresholds_value").first
    assert thresholds.inner_text().strip() == "80, 100"  # as typed, not as JSON
    size = overflow(page)
    assert size["scroll"] <= size["client"], size
    shoot(page, "16-scoped-tenant-1280")

    page.goto(f"{base}/admin/xaas_quotas/quotalimit/dashboard/")
    assert [row.get_attribute("data-tenant") for row in page.locator("tr.xaas-near-row").all()] == ["acme-chat"]
    shoot(page, "17-scoped-dashboard")
    assert_everything_was_served_locally(traffic, base)
