"""Property-based tests of the REST API from its LIVE OpenAPI schema (schemathesis, in-process over WSGI).

Every operation of ``/api/schema/`` is called with generated requests — valid ones and ones that break the schema
(negative mode) — authenticated with a real API key of the ``forest`` tree, and each answer must be no 5xx, a
declared status with a declared content type, conform to the declared response schema and headers, and refuse
what the schema refuses (``negative_data_rejection``).

Bounded and reproducible: ``SCHEMATHESIS_MAX_EXAMPLES`` per operation (default 40), derandomized (a fixed seed),
no example database. A larger budget outside the suite::

    SCHEMATHESIS_MAX_EXAMPLES=500 pytest tests/integration/test_api_schemathesis.py -q -s

prints the totals (requests per status) at the end of the module.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tenants.models import TENANT_ID_PATTERN

pytest_plugins = ["tests.api_fixtures"]
pytestmark = pytest.mark.django_db(transaction=True)

MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "40"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]
# Tenants of the forest a key of ``acme`` sees (and one it does not): generated tenant ids are swapped for these
# some of the time, so requests reach past the scope check to real quotas and usage.
TENANTS = ["acme", "acme-chat", "acme-chat-key-1", "acme-chat-key-2", "acme-search", "acme-search-key-1", "other"]
TOTALS: Counter[str] = Counter()


OPERATIONS = [
    ("POST", "/api/v1/events"),
    ("GET", "/api/v1/usage"),
    ("GET", "/api/v1/features"),
    ("GET", "/api/v1/entitlements"),
    ("GET", "/api/v1/quotas"),
    ("POST", "/api/v1/quotas"),
    ("GET", "/api/v1/quotas/{id}"),
    ("PUT", "/api/v1/quotas/{id}"),
    ("PATCH", "/api/v1/quotas/{id}"),
    ("DELETE", "/api/v1/quotas/{id}"),
]


@pytest.fixture
def api_schema(db: None) -> Any:
    """The schema as the running app serves it (not a copy): what clients get is what is tested."""
    from django.core.wsgi import get_wsgi_application

    schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", get_wsgi_application())
    schema.config.generation.update(
        max_examples=MAX_EXAMPLES,
        deterministic=True,
        with_security_parameters=False,  # the real key below, not generated Authorization headers
    )
    return schema


def test_every_operation_of_the_schema_is_tested(api_schema: Any) -> None:
    served = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert served == set(OPERATIONS)


def _real_tenant(value: object) -> object:
    """A schema-valid generated tenant id mapped onto a tenant of the tree (deterministically, by its length), or
    left as generated; an invalid one (negative mode) is never touched, so it stays invalid."""
    if isinstance(value, str) and re.fullmatch(TENANT_ID_PATTERN.removesuffix("$"), value) and len(value) % 3:
        return TENANTS[len(value) % len(TENANTS)]
    return value


def _reach_further(body: dict[str, Any], mode: GenerationMode) -> None:
    """Steer a generated body past the refusals random data nearly always meets, so valid requests get stored:
    a real tenant id now and then, and (valid requests only) no timestamp half of the time — a random one is
    almost always before 1970 or in the future, which the server refuses (422)."""
    if "tenant_id" in body:
        body["tenant_id"] = _real_tenant(body["tenant_id"])
    if mode is GenerationMode.POSITIVE and "timestamp" in body and len(str(body.get("transaction_id"))) % 2:
        del body["timestamp"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_every_operation_conforms_to_the_schema(
    api_schema: Any, keys: dict[str, str], quotas: list[int], method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]
    headers = {"Authorization": f"Bearer {keys['org']}"}

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as generated
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: Any) -> None:
        bodies = case.body.get("events") if isinstance(case.body, dict) and "events" in case.body else [case.body]
        for body in bodies if isinstance(bodies, list) else []:
            if isinstance(body, dict):
                _reach_further(body, mode)
        if isinstance(case.query, dict) and "tenant_id" in case.query:
            case.query["tenant_id"] = _real_tenant(case.query["tenant_id"])
        if isinstance(case.path_parameters, dict) and isinstance(case.path_parameters.get("id"), int):
            # Now and then an id that exists (in the key's subtree or not), else whatever was generated.
            generated = case.path_parameters["id"]
            if generated % 2:
                case.path_parameters["id"] = quotas[generated % len(quotas)]
        response = case.call_and_validate(headers=headers, checks=CHECKS)
        TOTALS["requests"] += 1
        TOTALS[f"{response.status_code // 100}xx"] += 1
        TOTALS[str(response.status_code)] += 1

    call()


@pytest.fixture
def quotas(forest: Any) -> list[int]:
    """Quotas on several levels (some writable by the key, one on its own tenant, one in another tree)."""
    from tests.quota_helpers import limit

    return [limit(tenant, 1000).pk for tenant in ("acme", "acme-chat", "acme-chat-key-1", "acme-search", "other")]


def teardown_module() -> None:
    if TOTALS:
        print("\nschemathesis totals:", dict(sorted(TOTALS.items())))
