"""Quota limits per tenant, feature and window, and reservations of quota for work whose size comes later."""

from __future__ import annotations

from decimal import Decimal

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models

from metering.events import quantity_to_units, units_to_quantity
from metering.exceptions import InvalidQuantity
from tenants.models import Tenant


def default_thresholds() -> list[int]:
    return [80, 100]


class QuotaLimit(models.Model):
    """At most ``limit`` of ``feature`` per ``period`` for the tenant's whole subtree. No row: unlimited."""

    class Period(models.TextChoices):
        HOUR = "hour", "hour"
        DAY = "day", "day"
        MONTH = "month", "month"
        TOTAL = "total", "total"

    class Enforcement(models.TextChoices):
        HARD = "hard", "hard (block)"
        SOFT = "soft", "soft (record and warn)"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="quota_limits")
    feature = models.CharField(max_length=100)
    limit = models.DecimalField(
        max_digits=24, decimal_places=6, validators=[MinValueValidator(Decimal(0))], help_text="0 blocks everything."
    )
    period = models.CharField(max_length=5, choices=Period.choices, default=Period.MONTH)
    enforcement = models.CharField(max_length=4, choices=Enforcement.choices, default=Enforcement.HARD)
    warning_thresholds = models.JSONField(
        default=default_thresholds, blank=True, help_text="Percentages of the limit that send quota_threshold_reached."
    )
    is_active = models.BooleanField("active", default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "quota limit"
        ordering = ["tenant__path", "feature", "period"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "feature", "period"], name="xaas_quota_unique_window"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id}:{self.feature} {self.limit}/{self.period}"

    @property
    def hard(self) -> bool:
        return self.enforcement == self.Enforcement.HARD

    @property
    def limit_units(self) -> int:
        return quantity_to_units(self.limit)

    def clean(self) -> None:
        from metering.events import validate_feature_name
        from metering.exceptions import InvalidFeatureName

        try:
            validate_feature_name(self.feature)
        except InvalidFeatureName as error:
            raise ValidationError({"feature": str(error)}) from error
        if self.limit is not None:
            try:
                quantity_to_units(self.limit)
            except InvalidQuantity as error:
                raise ValidationError({"limit": str(error)}) from error
        thresholds = self.warning_thresholds
        if not isinstance(thresholds, list) or not all(
            isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 100 for value in thresholds
        ):
            raise ValidationError({"warning_thresholds": "A list of whole percentages from 1 to 100."})


class QuotaReservation(models.Model):
    """Quota held for work in progress: counted against every level until committed, released or expired."""

    class State(models.TextChoices):
        ACTIVE = "active", "active"
        COMMITTED = "committed", "committed"
        RELEASED = "released", "released"
        EXPIRED = "expired", "expired"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="quota_reservations")
    feature = models.CharField(max_length=100)
    units = models.BigIntegerField()
    window_at = models.DateTimeField(help_text="The moment whose windows the reservation counts in.")
    expires_at = models.DateTimeField(db_index=True)
    state = models.CharField(max_length=9, choices=State.choices, default=State.ACTIVE, db_index=True)
    record = models.ForeignKey(
        "xaas_metering.UsageRecord", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "quota reservation"
        indexes = [models.Index(fields=["tenant", "feature", "state"], name="xaas_reservation_active")]

    def __str__(self) -> str:
        return f"{self.feature} {self.quantity} for {self.tenant_id} ({self.state})"

    @property
    def quantity(self) -> Decimal:
        return units_to_quantity(self.units)
