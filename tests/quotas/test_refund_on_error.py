"""``@enforce_quota(..., refund_on_error=True)``: charged only when the view succeeds; the default charges first."""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.test import RequestFactory

from metering.models import UsageRecord
from quotas.decorators import enforce_quota
from quotas.handler import QuotaPolicyHandler
from quotas.models import QuotaReservation
from tenants.lineage import get_context
from tests.factories import tree, usage
from tests.modes import FEATURE_BOUND
from tests.quota_helpers import limit

pytestmark = pytest.mark.django_db(transaction=True)


class Boom(Exception):
    pass


@pytest.fixture
def key() -> str:
    tree({"org": None, "key": "org"})
    limit("org", 3, feature="api_calls", period="day")
    return "key"


def _request(tenant_id: str) -> HttpRequest:
    request = RequestFactory().get("/work")
    request.tenant = get_context(tenant_id)  # type: ignore[attr-defined]
    return request


def _open_reservations() -> int:
    return QuotaReservation.objects.filter(state=QuotaReservation.State.ACTIVE).count()


def test_a_view_that_raises_is_not_charged_and_gives_the_quota_back(key: str):
    @enforce_quota("api_calls", 2, refund_on_error=True)
    def view(request: HttpRequest) -> HttpResponse:
        # The quantity is held while the view runs: no other request can take it.
        assert not QuotaPolicyHandler(key).check("api_calls", 2).allowed
        raise Boom

    with pytest.raises(Boom):
        view(_request(key))
    assert usage(key, "api_calls") == 0
    assert _open_reservations() == 0
    assert QuotaPolicyHandler(key).check("api_calls", 3).allowed  # all of it came back


def test_a_5xx_is_not_charged_a_4xx_is(key: str):
    status = {"code": 503}

    @enforce_quota("api_calls", 1, refund_on_error=True)
    def view(request: HttpRequest) -> HttpResponse:
        return HttpResponse(status=status["code"])

    assert view(_request(key)).status_code == 503
    assert usage(key, "api_calls") == 0
    status["code"] = 404  # the work was done; the client's mistake is still work
    assert view(_request(key)).status_code == 404
    assert usage(key, "api_calls") == 1
    assert _open_reservations() == 0


def test_a_success_is_charged_once_with_the_quota_headers_and_refusals_as_usual(key: str):
    @enforce_quota("api_calls", 2, refund_on_error=True)
    def view(request: HttpRequest) -> HttpResponse:
        return JsonResponse({"ok": True})

    first = view(_request(key))
    assert first.status_code == 200 and first.has_header("RateLimit")
    assert usage(key, "api_calls") == 2
    refused = view(_request(key))  # 2 more do not fit in 3
    assert refused.status_code == 429
    assert usage(key, "api_calls") == 2
    assert _open_reservations() == 0


def test_async_views_too(key: str):
    @enforce_quota("api_calls", 1, refund_on_error=True)
    async def failing(request: HttpRequest) -> HttpResponse:
        raise Boom

    @enforce_quota("api_calls", 1, refund_on_error=True)
    async def working(request: HttpRequest) -> HttpResponse:
        return JsonResponse({"ok": True})

    request = _request(key)
    with pytest.raises(Boom):
        async_to_sync(failing)(request)
    assert usage(key, "api_calls") == 0
    assert async_to_sync(working)(request).status_code == 200
    assert usage(key, "api_calls") == 1
    assert _open_reservations() == 0


def test_by_default_the_charge_comes_first_whatever_the_view_does(key: str):
    @enforce_quota("api_calls", 1)
    def view(request: HttpRequest) -> Any:
        raise Boom

    with pytest.raises(Boom):
        view(_request(key))
    assert usage(key, "api_calls") == 1  # documented: README "Enforcing quotas"


@pytest.mark.commit_mode(FEATURE_BOUND)
def test_a_commit_refused_after_the_view_ran_answers_why_and_holds_nothing(key: str, settings):
    """The tree's feature bound fills while the view runs: the commit is refused; a JSON 400, not a 500 in place of
    the view's answer, nothing recorded, the reservation given back at once."""
    from metering import UsageEvent, get_meter

    settings.METERING = {**settings.METERING, "MAX_FEATURES_PER_TREE": 1}

    @enforce_quota("api_calls", 1, refund_on_error=True)
    def view(request: HttpRequest) -> HttpResponse:
        get_meter().record_usage_sync(UsageEvent(key, "other_feature", 1))  # the tree's only feature slot
        return JsonResponse({"ok": True})

    response = view(_request(key))
    assert response.status_code == 400 and b"feature_name" in response.content
    assert usage(key, "api_calls") == 0
    assert _open_reservations() == 0


def test_a_tenant_deactivated_while_the_view_ran_is_not_charged(key: str):
    from tenants.models import Tenant

    @enforce_quota("api_calls", 1, refund_on_error=True)
    def view(request: HttpRequest) -> HttpResponse:
        tenant = Tenant.objects.get(external_id=key)
        tenant.is_active = False
        tenant.save()
        return JsonResponse({"ok": True})

    response = view(_request(key))
    assert response.status_code in (403, 404) and response["Content-Type"].startswith("application/json")
    assert UsageRecord.objects.filter(feature="api_calls").count() == 0
