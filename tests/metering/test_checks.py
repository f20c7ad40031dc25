from __future__ import annotations

import pytest
from django.core.checks import run_checks


def ids(**settings_kwargs):
    return {message.id for message in run_checks() if message.id and message.id.startswith("xaas")}


def test_default_configuration_is_clean(settings):
    # The defaults: commit mode (the suite's log run sets WRITE_MODE, which wants a Redis with AOF: E041 here).
    settings.METERING = {key: value for key, value in settings.METERING.items() if "WRITE_MODE" not in key}
    settings.METERING.pop("LOG_DRAIN_EAGER", None)
    assert ids() == set()


def test_misconfiguration_is_reported_with_namespaced_ids(settings):
    settings.METERING = {
        "ADAPTER": "nowhere.Adapter",
        "BATCH_SIZE": 0,
        "SINK_URL": "ftp://lago",
        "DATABASE_ALIAS": "missing",
        "CACHE_ALIAS": "missing",
        "TENANT_RESOLVER": "nowhere.resolve",
        "COUNTER_TTL_SECONDS": -1,
        "BATCHSIZE": 10,
    }
    assert ids() == {
        "xaas_metering.E001",
        "xaas_metering.E002",
        "xaas_metering.E003",
        "xaas_metering.E004",
        "xaas_metering.E005",
        "xaas_metering.W001",
        "xaas_tenants.E001",
        "xaas_tenants.E002",
    }


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_sqlite_without_immediate_transactions_is_warned(settings):
    settings.DATABASES = {
        **settings.DATABASES,
        "other": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
    }
    assert "xaas_tenants.W001" in ids()


def test_adapter_misconfiguration_is_a_clear_error_at_use(settings):
    from django.core.exceptions import ImproperlyConfigured

    from metering import get_meter

    settings.METERING = {"ADAPTER": "nowhere.Adapter"}
    with pytest.raises(ImproperlyConfigured, match=r"nowhere\.Adapter"):
        get_meter()
    settings.METERING = {"ADAPTER": "decimal.Context"}
    with pytest.raises(ImproperlyConfigured, match="MeteringProtocol"):
        get_meter()
