"""The feature registry (metering.features): definitions, the closed registry, the command, the API, the admin."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client, override_settings

from metering import features
from metering.exceptions import InvalidFeatureDefinition, InvalidFeatureName, UnknownFeature
from metering.features import Aggregation, define, spec
from metering.models import FeatureDefinition, UsageRecord
from quotas.handler import QuotaPolicyHandler
from tests.admin_fixtures import staff_user, superuser
from tests.api_helpers import error_of, event
from tests.factories import record, tree, usage

pytest_plugins = ["tests.api_fixtures"]

ORG = {"org": None, "org-app": "org"}


@pytest.fixture(autouse=True)
def _fresh_cache():
    features.forget()
    yield
    features.forget()


def closed(settings_metering: dict) -> override_settings:
    return override_settings(METERING={**settings_metering, "FEATURE_REGISTRY": "closed"})


@pytest.mark.django_db
def test_an_unregistered_feature_is_a_sum_and_a_registered_one_says_what_it_is():
    assert spec("llm_tokens") == features.FeatureSpec(name="llm_tokens")
    assert spec("llm_tokens").aggregation == "sum" and not spec("llm_tokens").registered
    define("storage_bytes", Aggregation.LATEST, unit="bytes")
    define("seats", Aggregation.UNIQUE_COUNT, property_name="user_id")
    storage = spec("storage_bytes")
    assert (storage.aggregation, storage.unit, storage.registered, storage.is_gauge) == ("latest", "bytes", True, True)
    assert spec("seats").property_name == "user_id" and not spec("seats").is_gauge


@pytest.mark.django_db
def test_the_aggregation_of_a_registered_feature_never_changes_but_its_unit_may():
    define("api_calls", Aggregation.COUNT, unit="calls")
    with pytest.raises(InvalidFeatureDefinition) as refused:
        define("api_calls", Aggregation.SUM)
    assert refused.value.field == "aggregation"
    row = define("api_calls", Aggregation.COUNT, unit="requests", description="HTTP calls")
    assert FeatureDefinition.objects.get().unit == "requests" == spec("api_calls").unit
    assert row.description == "HTTP calls"
    assert FeatureDefinition.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "", "aggregation": "sum"}, "feature_name"),
        ({"name": "bad name", "aggregation": "sum"}, "feature_name"),
        ({"name": "x\x00", "aggregation": "sum"}, "feature_name"),
        ({"name": "x", "aggregation": "median"}, "aggregation"),
        ({"name": "x", "aggregation": "SUM"}, "aggregation"),
        ({"name": "x", "aggregation": "sum", "unit": "G\x00B"}, "unit"),
        ({"name": "x", "aggregation": "sum", "unit": "\ud800"}, "unit"),
        ({"name": "x", "aggregation": "sum", "unit": " GB"}, "unit"),
        ({"name": "x", "aggregation": "sum", "unit": "G" * 33}, "unit"),
        ({"name": "x", "aggregation": "unique_count"}, "property"),
        ({"name": "x", "aggregation": "sum", "property_name": "user_id"}, "property"),
        ({"name": "x", "aggregation": "unique_count", "property_name": "user\nid"}, "property"),
        ({"name": "x", "aggregation": "sum", "rolls_up": False}, "rolls_up"),
    ],
)
def test_a_bad_definition_is_refused_by_field_and_nothing_is_saved(kwargs, field):
    with pytest.raises((InvalidFeatureDefinition, InvalidFeatureName)) as refused:
        define(**kwargs)
    assert refused.value.field == field
    assert not FeatureDefinition.objects.exists()


@pytest.mark.django_db
def test_a_closed_registry_refuses_unregistered_features_everywhere_and_records_registered_ones(settings):
    tree(ORG)
    define("llm_tokens", unit="tokens")
    with closed(settings.METERING):
        with pytest.raises(UnknownFeature):
            record("org-app", 5, feature="gpu_seconds")
        with pytest.raises(UnknownFeature):
            QuotaPolicyHandler("org-app").consume("gpu_seconds", 1)
        with pytest.raises(UnknownFeature):
            QuotaPolicyHandler("org-app").reserve("gpu_seconds", 1)
        record("org-app", 5, feature="llm_tokens")
        QuotaPolicyHandler("org-app").consume("llm_tokens", 2)
        assert usage("org", "llm_tokens") == 7
    assert list(UsageRecord.objects.values_list("feature", flat=True).distinct()) == ["llm_tokens"]
    record("org-app", 1, feature="gpu_seconds")  # open again (the default): unregistered is a sum
    assert usage("org", "gpu_seconds") == 1


@pytest.mark.django_db
def test_a_feature_registered_meanwhile_is_recordable_in_this_process_at_once(settings):
    tree(ORG)
    with closed(settings.METERING):
        with pytest.raises(UnknownFeature):
            record("org-app", 1, feature="gpu_seconds")
        define("gpu_seconds", unit="s")  # the save forgets this process's cached "not registered"
        record("org-app", 1, feature="gpu_seconds")
        FeatureDefinition.objects.get(name="gpu_seconds").delete()
        with pytest.raises(UnknownFeature):
            record("org-app", 1, feature="gpu_seconds")
    assert usage("org", "gpu_seconds") == 1


def test_the_closed_registry_over_http_is_a_422_naming_the_feature(api, settings):
    with closed(settings.METERING):
        response = api.post("/api/v1/events", event(feature_name="gpu_seconds"))
        assert response.status_code == 422, response.content
        error = error_of(response)
        assert error["details"] == {"0": {"feature_name": ["unknown_feature"]}}
        assert "not registered" in error["messages"]["0"]["feature_name"][0]
        define("gpu_seconds")
        assert api.post("/api/v1/events", event(feature_name="gpu_seconds")).status_code in (200, 201)
    assert UsageRecord.objects.filter(feature="gpu_seconds").count() == 1


def test_any_key_lists_the_registry_and_no_key_gets_401(api):
    define("storage_bytes", Aggregation.LATEST, unit="bytes")
    define("seats", Aggregation.UNIQUE_COUNT, property_name="user_id")
    for role in ("child", "unrelated"):
        response = api.get("/api/v1/features", key=role)
        assert response.status_code == 200, response.content
        body = response.json()
        assert body["count"] == 2
        assert [(row["name"], row["aggregation"], row["property"]) for row in body["results"]] == [
            ("seats", "unique_count", "user_id"),
            ("storage_bytes", "latest", ""),
        ]
    assert api.get("/api/v1/features", key=None).status_code == 401
    assert api.get("/api/v1/features", key="revoked").status_code == 401
    assert error_of(api.get("/api/v1/features", key="child", page="999"))["code"] == "invalid_page"


@pytest.mark.django_db
def test_the_command_adds_and_lists_and_names_the_bad_field():
    out = StringIO()
    call_command("feature", "add", "storage_bytes", "--aggregation", "latest", "--unit", "bytes", stdout=out)
    call_command("feature", "add", "seats", "--aggregation", "unique_count", "--property", "user_id", stdout=out)
    assert "Registered storage_bytes (latest, bytes)." in out.getvalue()
    listed = StringIO()
    call_command("feature", "list", "--json", stdout=listed)
    assert [
        (row["name"], row["aggregation"], row["unit"], row["property"]) for row in json.loads(listed.getvalue())
    ] == [
        ("seats", "unique_count", "", "user_id"),
        ("storage_bytes", "latest", "bytes", ""),
    ]
    with pytest.raises(CommandError, match=r"^property: "):
        call_command("feature", "add", "emails", "--aggregation", "unique_count")
    with pytest.raises(CommandError, match=r"^aggregation: "):
        call_command("feature", "add", "seats", "--aggregation", "sum")
    with pytest.raises(CommandError, match=r"^feature_name: "):
        call_command("feature", "add", "se\x00ats")
    with pytest.raises(CommandError, match=r"^description: "):
        call_command("feature", "add", "notes", "--description", "a\x00b")
    plain = StringIO()
    call_command("feature", "list", stdout=plain)
    assert plain.getvalue().splitlines()[0].split("\t") == ["seats", "unique_count of user_id", ""]


@pytest.mark.django_db
def test_an_empty_registry_lists_what_unregistered_features_are(settings):
    out = StringIO()
    call_command("feature", "list", stdout=out)
    assert "unregistered ones are sums" in out.getvalue()
    with closed(settings.METERING):
        out = StringIO()
        call_command("feature", "list", stdout=out)
        assert "unregistered ones are refused" in out.getvalue()


@pytest.mark.django_db
def test_the_admin_registers_features_fixes_the_aggregation_and_hides_them_from_scoped_admins():
    tree(ORG)
    client = Client()
    client.force_login(superuser())
    response = client.post(
        "/admin/xaas_metering/featuredefinition/add/",
        {"name": "seats", "aggregation": "unique_count", "unit": "", "property_name": "", "description": ""},
    )
    assert response.status_code == 200 and b"needs the metadata property" in response.content
    assert not FeatureDefinition.objects.exists()
    response = client.post(
        "/admin/xaas_metering/featuredefinition/add/",
        {"name": "seats", "aggregation": "unique_count", "unit": "", "property_name": "user_id", "rolls_up": "on"},
    )
    assert response.status_code == 302, response.content
    row = FeatureDefinition.objects.get()
    change = client.get(f"/admin/xaas_metering/featuredefinition/{row.pk}/change/")
    assert change.status_code == 200
    assert b'name="aggregation"' not in change.content  # read-only once saved
    client.post(
        f"/admin/xaas_metering/featuredefinition/{row.pk}/change/",
        {"unit": "users", "aggregation": "sum", "description": ""},
    )
    row.refresh_from_db()
    assert (row.aggregation, row.unit) == ("unique_count", "users")
    scoped = Client()
    scoped.force_login(staff_user("scoped", "org"))
    assert scoped.get("/admin/xaas_metering/featuredefinition/").status_code == 403


def test_a_bad_registry_setting_is_a_system_check_error(settings):
    from django.core.checks import run_checks

    settings.METERING = {**settings.METERING, "FEATURE_REGISTRY": "shut"}
    assert "xaas_metering.E037" in {message.id for message in run_checks()}
