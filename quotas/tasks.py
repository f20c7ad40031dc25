"""Periodic work of the quotas: give abandoned reservations back."""

from __future__ import annotations

from celery import shared_task

from .handler import expire_reservations


@shared_task(name="quotas.expire_reservations", ignore_result=True)
def expire_reservations_task() -> int:
    return expire_reservations()
