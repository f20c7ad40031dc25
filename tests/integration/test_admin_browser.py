"""The admin driven in a real headless Chromium (Debian's ``chromium`` through Playwright) against a live server.

Logs in, opens the tenant tree, edits a quota on the tenant page and in the quota list, and checks that the usage
bar and the chart are drawn; screenshots go to ``test-artifacts/`` (or ``$TEST_ARTIFACTS_DIR``). Without Chromium
(or Playwright) these tests skip, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection, connections

from quotas.models import QuotaLimit
from tests import services
from tests.admin_fixtures import PASSWORD, build_forest, record_days_ago, staff_user, superuser
from tests.factories import record
from tests.quota_helpers import limit

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
AMBER, RED, GREEN = "rgb(224, 148, 0)", "rgb(198, 40, 40)", "rgb(46, 125, 50)"


def require_chromium() -> None:
    """Skip without Chromium or Playwright; under CI=true fail instead (the browser tests must run in CI)."""
    problem = None
    if not Path(CHROMIUM).is_file():
        problem = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "Playwright is not installed (pip install -e '.[dev]')"
    if problem is None:
        return
    if services.in_ci():
        pytest.fail(f"{problem} (CI=true: the browser tests must run)")
    pytest.skip(problem)


def artifacts() -> Path:
    directory = Path(os.environ.get("TEST_ARTIFACTS_DIR", Path(settings.BASE_DIR) / "test-artifacts"))
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@dataclass
class Traffic:
    """What the browser asked for and which script errors it saw, for the no-CDN checks."""

    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@pytest.fixture
def traffic() -> Traffic:
    return Traffic()


@pytest.fixture
def page(transactional_db, live_server, monkeypatch, traffic) -> Iterator[Any]:
    """A Chromium page on the live server, recording every request and script error for the no-CDN checks.

    ``transactional_db`` first: the test database is then set up before the live server starts, and dropped only
    after the server (and its database connections) stopped.
    """
    require_chromium()
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in this thread; the ORM calls of the test itself are synchronous.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1680, "height": 1000})
        tab = context.new_page()
        tab.set_default_timeout(20_000)
        tab.on("request", lambda request: traffic.requests.append(request.url))
        tab.on("pageerror", lambda error: traffic.errors.append(str(error)))
        try:
            yield tab
        finally:
            context.close()
            browser.close()
            # While Playwright's loop runs, the test's ORM calls get their own (context-local) connections: close
            # them here, in that same context, or they would keep the test database open.
            connections.close_all()


def shoot(page: Any, name: str) -> Path:
    path = artifacts() / f"admin-{connection.vendor}-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def log_in(page: Any, base: str, username: str, next_url: str) -> None:
    page.goto(f"{base}/admin/login/?next={next_url}")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(f"{base}{next_url}")


def bar_state(page: Any, scope: str = "body") -> dict[str, Any]:
    """What the first usage bar under ``scope`` looks like on screen: its data, colour and filled fraction."""
    bar = page.locator(f"{scope} .xaas-usage").first
    fill = bar.locator(".xaas-usage-fill")
    track = bar.locator("[role=meter]")
    fill_box, track_box = fill.bounding_box(), track.bounding_box()
    return {
        "level": bar.get_attribute("data-level"),
        "used": bar.get_attribute("data-used"),
        "limit": bar.get_attribute("data-limit"),
        "colour": fill.evaluate("element => getComputedStyle(element).backgroundColor"),
        "fraction": round(fill_box["width"] / (track_box["width"] - 2), 2),  # the track has a 1px border
        "text": bar.inner_text(),
    }


def assert_everything_was_served_locally(traffic: Traffic, base: str) -> None:
    assert traffic.requests, "no request was recorded"
    foreign = [url for url in traffic.requests if not (url.startswith(base) or url.startswith("data:"))]
    assert foreign == [], f"requests outside the live server (a CDN?): {foreign}"
    assert traffic.errors == [], f"script errors: {traffic.errors}"


@pytest.fixture
def usage_history(transactional_db):
    build_forest()
    record("acme-chat-key-1", 1500)  # today
    for days in range(1, 30):
        record_days_ago("acme-chat-key-1", 10 * days, days=days)
        record_days_ago("acme-chat-key-2", 5, days=days, feature="api_calls")
    record("other-project", 99)
    return limit("acme-chat", 2000, period="day")  # 1500 of 2000 today: 75 %, below the first threshold (80)


def test_an_operator_logs_in_sees_the_tree_edits_a_quota_and_sees_bar_and_chart(
    page, traffic, live_server, usage_history
):
    base = live_server.url
    superuser("operator")
    quota = usage_history

    # The tree: indented, every tenant, with usage bars.
    log_in(page, base, "operator", "/admin/xaas_tenants/tenant/")
    nodes = page.locator(".xaas-tree-node")
    names = [text.lstrip("└ ").strip() for text in nodes.all_inner_texts()]
    assert names[:4] == ["acme", "acme-chat", "acme-chat-key-1", "acme-chat-key-2"] and "other-project" in names
    text_left = "e => e.getBoundingClientRect().left + parseFloat(getComputedStyle(e).paddingLeft)"
    left = {name: nodes.nth(index).evaluate(text_left) for index, name in enumerate(names)}
    assert left["acme"] < left["acme-chat"] < left["acme-chat-key-1"]  # drawn indented, one step per level
    assert left["acme-chat-key-1"] == left["acme-chat-key-2"] and left["acme"] == left["other"]
    row = page.locator("tr", has=page.locator(".xaas-tree-node", has_text="acme-chat")).first
    assert bar_state(page, "#result_list")["level"] == "ok"
    assert "llm_tokens/day" in row.inner_text()
    shoot(page, "01-tree")

    # The tenant page: quotas inline with a usage bar, and a chart per feature.
    page.click(".xaas-tree-node:text-is('└ acme-chat')")
    page.wait_for_selector("#usage-charts")
    assert page.locator(".breadcrumbs").inner_text().endswith("acme \u203a acme-chat")
    state = bar_state(page, "#quota_limits-group")
    assert (state["level"], state["used"], state["limit"], state["colour"]) == ("ok", "1500", "2000", GREEN)
    assert state["fraction"] == pytest.approx(0.75, abs=0.02)
    charts = page.locator("figure.xaas-usage-chart")
    assert sorted(charts.evaluate_all("figures => figures.map(f => f.dataset.feature)")) == ["api_calls", "llm_tokens"]
    llm = page.locator("figure.xaas-usage-chart[data-feature=llm_tokens]")
    assert llm.locator("svg[role=img] > title").text_content() == "llm_tokens per day, last 30 days"
    bars = llm.locator("rect.bar")
    assert bars.count() == 30
    heights = [box["height"] for box in (bars.nth(index).bounding_box() for index in range(30))]
    assert all(height > 0 for height in heights)  # every day has usage: every bar is drawn
    assert heights[-1] == max(heights) and heights[-1] > 50  # today's 1500 is the tallest, drawn on screen
    assert heights[-2] == pytest.approx(heights[-1] * 10 / 1500, rel=0.1)  # yesterday's 10
    assert llm.locator("g.limit line").count() == 1  # the daily quota drawn as a line
    shoot(page, "02-tenant")

    # Edit the quota on the tenant page: 1500 of 1600 -> amber.
    page.fill("input[name='quota_limits-0-limit']", "1600")
    page.click("input[name=_continue]")
    page.wait_for_selector(".messagelist .success")
    state = bar_state(page, "#quota_limits-group")
    assert (state["level"], state["limit"], state["colour"]) == ("warn", "1600", AMBER)
    assert state["fraction"] == pytest.approx(1500 / 1600, abs=0.02)
    assert "1,500 / 1,600 (94%)" in state["text"]
    assert page.locator("figure.xaas-usage-chart[data-feature=llm_tokens] text", has_text="daily limit 1,600").count()
    shoot(page, "03-tenant-after-edit")
    quota.refresh_from_db()
    assert quota.limit == Decimal(1600)

    # List editing in the quotas list: 1500 of 1400 -> red, the bar full.
    page.goto(f"{base}/admin/xaas_quotas/quotalimit/")
    page.fill("input[name='form-0-limit']", "1400")
    page.click("input[name=_save]")
    page.wait_for_selector(".messagelist .success")
    state = bar_state(page, "#result_list")
    assert (state["level"], state["limit"], state["colour"]) == ("over", "1400", RED)
    assert state["fraction"] == pytest.approx(1.0, abs=0.02)
    shoot(page, "04-quota-list")
    quota.refresh_from_db()
    assert quota.limit == Decimal(1400)
    assert_everything_was_served_locally(traffic, base)


def test_a_tenant_administrator_sees_its_subtree_and_may_limit_only_below_it(page, traffic, live_server, usage_history):
    base = live_server.url
    staff_user("chat-admin", "acme-chat")

    log_in(page, base, "chat-admin", "/admin/xaas_tenants/tenant/")
    names = [text.lstrip("└ ").strip() for text in page.locator(".xaas-tree-node").all_inner_texts()]
    assert names == ["acme-chat", "acme-chat-key-1", "acme-chat-key-2"]
    assert "other" not in page.locator("#result_list").inner_text().replace("acme", "")
    shoot(page, "05-scoped-tree")

    # Its own tenant: bar and chart drawn, nothing editable.
    page.click(".xaas-tree-node:text-is('acme-chat')")
    page.wait_for_selector("#usage-charts")
    assert page.locator("input[name=_save]").count() == 0
    assert page.locator("input[name='quota_limits-0-limit']").count() == 0
    assert bar_state(page, "#quota_limits-group")["level"] == "ok"
    assert page.locator("figure.xaas-usage-chart[data-feature=llm_tokens] rect.bar").count() == 30
    assert "acme \u203a" not in page.locator(".breadcrumbs").inner_text()  # the ancestor is not named
    shoot(page, "06-scoped-own-tenant")

    # A new quota: the tenant picker offers only the strict descendants.
    page.goto(f"{base}/admin/xaas_quotas/quotalimit/add/")
    page.click(".field-tenant .select2-selection")
    page.wait_for_selector(".select2-results__option:not(.loading-results)")
    offered = page.locator(".select2-results__option").all_inner_texts()
    assert sorted(offered) == ["acme-chat-key-1", "acme-chat-key-2"]
    shoot(page, "07-scoped-quota-tenant-choices")
    page.click(".select2-results__option:text-is('acme-chat-key-2')")
    page.fill("#id_feature", "llm_tokens")
    page.fill("#id_limit", "300")
    page.click("input[name=_save]")
    page.wait_for_selector(".messagelist .success")
    assert QuotaLimit.objects.filter(tenant__external_id="acme-chat-key-2", limit=300).exists()
    assert_everything_was_served_locally(traffic, base)
