"""A bulk import SIGKILLed in the middle of a batch (a real process, right before its COMMIT): nothing of that batch
is stored, the batches before it are, and re-running the import records nothing twice."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from metering import counters
from metering.importer import run_import
from metering.models import UsageOutbox, UsageRecord
from metering.windows import window
from tenants.models import Tenant
from tests.factories import tree, usage
from tests.faults import wait_until
from tests.log_helpers import assert_facts_match_rollups
from tests.modes import WRITE_UNIT

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.redis]

ORG = {"org": None, "p1": "org", "k1": "p1", "k2": "p1"}
ROOT_DIR = Path(__file__).resolve().parent.parent.parent
WEBHOOK = {"ADAPTER": "metering.adapters.webhook.WebhookMeteringAdapter", "SINK_URL": "http://127.0.0.1:9/usage"}


@pytest.mark.commit_mode(WRITE_UNIT)
def test_an_import_killed_mid_batch_leaves_nothing_half_written_and_a_rerun_records_nothing_twice(
    redis_cache, tmp_path: Path
):
    tree(ORG)
    month = window("month", datetime.now(UTC))
    assert usage("org", "llm_tokens", *month) == 0  # the live counters exist
    path = tmp_path / "usage.jsonl"
    path.write_text("".join(json.dumps(event(i)) + "\n" for i in range(500)))
    total = sum(1 + i % 5 for i in range(500))
    first_two = sum(1 + i % 5 for i in range(200))
    marker = tmp_path / "marker"
    config = {
        "database": {key: connection.settings_dict.get(key) for key in ("NAME", "HOST", "PORT", "USER")},
        "caches": settings.CACHES,
        "metering": {**settings.METERING, **WEBHOOK},
        "file": str(path),
        "batch_size": 100,
        "pause_batch": 3,
        "marker": str(marker),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.bulk_worker", json.dumps(config, default=str)],
        cwd=ROOT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: marker.exists() or process.poll() is not None, 120, "the importer to reach its pause")
        assert process.poll() is None, process.communicate()[1][-3000:]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    # Two batches committed; the third, killed before its COMMIT, left no fact, rollup or outbox row.
    assert UsageRecord.objects.count() == 200
    assert UsageOutbox.objects.count() == 200
    assert_facts_match_rollups()
    # The killed batch had already added to the live counters (they are changed right before COMMIT, as for a single
    # fact): an over-count, never an under-count (it refuses more, never lets usage overshoot), which the
    # reconciliation repairs (and the counters' TTL heals).
    root = Tenant.objects.get(external_id="org").pk
    live = usage("org", "llm_tokens", *month)
    assert live in (Decimal(first_two), Decimal(first_two + sum(1 + i % 5 for i in range(200, 300))))
    counters.compare_live(root, repair=True, using="default")
    assert usage("org", "llm_tokens", *month) == Decimal(first_two)
    with settings_override(WEBHOOK), path.open("rb") as stream:
        report = run_import(stream, "jsonl", batch_size=64)
    assert (report.imported, report.duplicates) == (300, 200)
    assert UsageRecord.objects.count() == 500
    assert UsageOutbox.objects.count() == 500
    assert_facts_match_rollups()
    assert usage("org", "llm_tokens", *month) == Decimal(total)
    assert counters.compare_live(root, repair=False, using="default") == []


def event(i: int) -> dict[str, object]:
    tenant = ("k1", "k2", "p1")[i % 3]
    return {"tenant_id": tenant, "feature_name": "llm_tokens", "quantity": 1 + i % 5, "transaction_id": f"tx-{i}"}


def settings_override(extra: dict[str, str]):
    from django.test import override_settings

    return override_settings(METERING={**settings.METERING, **extra})
