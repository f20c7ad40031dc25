"""The demo endpoints: the brief's AIService recording llm_tokens for the tenant of the API key (narrowed by
X-Tenant-ID to a tenant of the key's subtree).

``/demo/completions`` (sync view) and ``/demo/completions-async`` (the async service) answer alike.
"""

from __future__ import annotations

import json

import pytest
from django.test import AsyncClient, Client

from metering.models import UsageRecord
from tests.factories import tree, usage
from tests.identity_helpers import acting_for

pytestmark = pytest.mark.django_db(transaction=True)

ORG = {"org": None, "p1": "org", "k1": "p1"}
ENDPOINTS = ["/demo/completions", "/demo/completions-async"]


@pytest.fixture(params=ENDPOINTS)
def endpoint(request):
    return request.param


def post(client: Client, body: object, tenant: str | None = "k1", raw: bytes | None = None, path: str = ENDPOINTS[0]):
    headers = acting_for(tenant, key_tenant="org") if tenant else {}
    data = raw if raw is not None else json.dumps(body)
    return client.post(path, data=data, content_type="application/json", headers=headers)


def test_a_completion_costs_one_token_per_word_at_every_level(endpoint):
    tree(ORG)
    response = post(Client(), {"prompt": "the quick  brown fox"}, path=endpoint)
    assert response.status_code == 200
    assert response.json() == {"text": "the quick brown fox", "tokens": 4}
    post(Client(), {"prompt": "jumps"}, path=endpoint)
    assert usage("k1") == 5
    assert usage("org") == 5
    fact = UsageRecord.objects.order_by("id").first()
    assert fact is not None and fact.metadata["model"] == "fake-echo"


def test_the_endpoint_serves_async_clients(endpoint):
    from asgiref.sync import async_to_sync

    tree(ORG)
    headers = acting_for("k1", key_tenant="org")

    async def call():
        return await AsyncClient().post(
            endpoint,
            data={"prompt": "one two"},
            content_type="application/json",
            headers=headers,
        )

    response = async_to_sync(call)()
    assert response.status_code == 200
    assert response.json()["tokens"] == 2
    assert usage("org") == 2


@pytest.mark.parametrize(
    ("body", "raw", "tenant", "status", "code", "field"),
    [
        ({"prompt": "hi"}, None, None, 401, "not_authenticated", "Authorization"),
        ({"prompt": "hi"}, None, "ghost", 404, "unknown_tenant", "X-Tenant-ID"),
        (None, b"{not json", "k1", 400, "invalid_json", "body"),
        (["prompt"], None, "k1", 400, "invalid_json", "body"),
        ({}, None, "k1", 400, "invalid_prompt", "prompt"),
        ({"prompt": 42}, None, "k1", 400, "invalid_prompt", "prompt"),
        ({"prompt": "   "}, None, "k1", 400, "invalid_prompt", "prompt"),
        ({"prompt": "x " * 20_000}, None, "k1", 400, "invalid_prompt", "prompt"),
    ],
)
def test_bad_requests_get_a_json_error_naming_the_field_and_record_nothing(
    body, raw, tenant, status, code, field, endpoint
):
    tree(ORG)
    response = post(Client(), body, tenant=tenant, raw=raw, path=endpoint)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["field"] == field
    assert UsageRecord.objects.count() == 0


def test_get_is_not_allowed(endpoint):
    tree(ORG)
    assert Client().get(endpoint, headers={"X-Tenant-ID": "k1"}).status_code == 405


def test_an_inactive_tenant_is_refused(endpoint):
    from tenants.models import Tenant

    tree(ORG)
    tenant = Tenant.objects.get(external_id="p1")
    tenant.is_active = False
    tenant.save()
    response = post(Client(), {"prompt": "hi"}, path=endpoint)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "inactive_tenant"


def test_the_briefs_ai_service_records_through_any_metering_protocol():
    """The brief's example as written: AIService(meter).generate(tenant, prompt) records what the model cost."""
    from asgiref.sync import async_to_sync

    from metering import get_meter
    from project.demo import AIService
    from tenants.lineage import get_context

    tree(ORG)
    service = AIService(get_meter())
    completion = async_to_sync(service.generate)(get_context("k1"), "count these four words")
    assert completion.tokens == 4
    assert usage("p1") == 4
    assert UsageRecord.objects.get().metadata == {"model": "fake-echo", "prompt_chars": 22}
