"""Periodic work of the quotas: give abandoned reservations back, forget old refusal counts."""

from __future__ import annotations

from celery import shared_task

from . import refusals
from .handler import expire_reservations


@shared_task(name="quotas.expire_reservations", ignore_result=True)
def expire_reservations_task() -> int:
    return expire_reservations()


@shared_task(name="quotas.prune_refusals", ignore_result=True)
def prune_refusals_task() -> int:
    return refusals.prune()
