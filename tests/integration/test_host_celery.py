"""Celery in a host project: one schedule for the stack, a check when nothing sweeps the outbox, and operators
told the truth about what the outbox still holds."""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from django.core.checks import run_checks
from django.core.management import call_command

from metering.schedule import beat_schedule as metering_beat_schedule
from quotas.schedule import beat_schedule
from tenants.models import Tenant
from tests.lago_support import record, states

pytest_plugins = ["tests.lago_fixtures"]


def test_the_stack_schedule_names_registered_tasks_of_every_app():
    from celery import current_app

    import metering.tasks  # noqa: F401  (registers the tasks)
    import quotas.tasks  # noqa: F401

    schedule = beat_schedule(sweep_seconds=7, expiry_seconds=11)
    tasks = {entry["task"] for entry in schedule.values()}
    assert tasks == {
        "metering.sweep_outbox",
        "metering.fold_rollups",
        "metering.drain_log",
        "quotas.expire_reservations",
        "quotas.prune_refusals",
    }
    assert tasks <= set(current_app.tasks)  # a typo in a task name would schedule nothing
    assert schedule["metering-sweep-outbox"]["schedule"] == 7.0
    assert schedule["quotas-expire-reservations"]["schedule"] == 11.0
    assert set(metering_beat_schedule()) < set(schedule)  # quotas adds to metering's, never the other way round


def test_the_example_project_uses_the_stack_schedule():
    from project import settings as example

    assert {entry["task"] for entry in example.CELERY_BEAT_SCHEDULE.values()} == {
        entry["task"] for entry in beat_schedule().values()
    }


def _ids() -> set[str]:
    return {message.id for message in run_checks() if message.id}


def test_a_sink_without_a_sweep_is_reported(settings: Any, lago_settings: Any):
    assert "xaas_metering.W050" not in _ids()  # the suite's settings schedule the sweep
    settings.CELERY_BEAT_SCHEDULE = {"other": {"task": "somewhere.else", "schedule": 5.0}}
    assert "xaas_metering.W050" in _ids()
    settings.METERING = {}  # the database adapter has no outbox: nothing to sweep
    assert "xaas_metering.W050" not in _ids()


@pytest.mark.django_db(transaction=True)
def test_metering_flush_reports_what_the_outbox_still_holds(lago_settings: Any, org: dict[str, Tenant]):
    for index in range(8):
        record("other", 1, transaction_id=f"held-{index}")  # "other" has no Lago subscription: held
    out = StringIO()
    call_command("metering_flush", "--no-progress", stdout=out)
    call_command("metering_flush", "--no-progress", stdout=(second := StringIO()))
    assert states() == {"held": 8}
    for output in (out.getvalue(), second.getvalue()):
        assert "lago outbox: 8 held in all (no subscription yet: --release-held once they have one), 0 dead" in output
    assert "0 held, 0 to retry" in second.getvalue()  # this run held nothing new, and says both
