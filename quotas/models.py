"""Quota limits per tenant, feature and window, and reservations of quota for work whose size comes later."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import connections, models, router, transaction

from metering.events import quantity_to_units, units_to_quantity
from metering.exceptions import InvalidQuantity
from tenants.models import Tenant

# The largest limit: what the ``limit`` column holds, numeric(24,6): 10**18 - 10**-6 of a unit, compared exactly by
# the counters. A limit bounds a window's total, so it may be far above MAX_QUANTITY (one fact's bound). SQLite has
# no exact decimal type and Django reads its decimals back through 15 significant digits, so there a limit is also
# refused beyond 15 significant digits (it would come back rounded): 999999999.999999 or 999999999999999000 are fine.
MAX_LIMIT_UNITS = 10**24 - 1
SQLITE_LIMIT_DIGITS = 15


def limit_to_units(value: object) -> int:
    """Exact units of a quota limit (the quantity grammar, up to ``MAX_LIMIT_UNITS``). Raises ``InvalidQuantity``."""
    return quantity_to_units(value, maximum_units=MAX_LIMIT_UNITS)


def stored_exactly(units: int, using: str | None = None) -> bool:
    """Whether the database holding quota limits stores a limit of ``units`` exactly."""
    if connections[using or router.db_for_write(QuotaLimit)].vendor == "postgresql":
        return True
    return len(str(units).rstrip("0")) <= SQLITE_LIMIT_DIGITS


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

    # A change of limit bumps its tree's counter epoch in the change's own transaction: from its commit on, every
    # decision in every process reloads the tree's rules (``quotas.rules``). ``QuerySet.update`` bumps nothing.

    def save(self, *args: Any, **kwargs: Any) -> None:
        using = kwargs.get("using") or router.db_for_write(QuotaLimit, instance=self)
        with transaction.atomic(using=using):
            super().save(*args, **kwargs)
            _retire_tree_rules(self.tenant_id, using)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        using = kwargs.get("using") or router.db_for_write(QuotaLimit, instance=self)
        tenant_pk = self.tenant_id
        with transaction.atomic(using=using):
            deleted = super().delete(*args, **kwargs)
            _retire_tree_rules(tenant_pk, using)
        return deleted

    @property
    def hard(self) -> bool:
        return self.enforcement == self.Enforcement.HARD

    @property
    def limit_units(self) -> int:
        return limit_to_units(self.limit)

    def clean(self) -> None:
        from metering.events import validate_feature_name
        from metering.exceptions import InvalidFeatureName

        try:
            validate_feature_name(self.feature)
        except InvalidFeatureName as error:
            raise ValidationError({"feature": str(error)}) from error
        if self.limit is not None:
            try:
                units = limit_to_units(self.limit)
            except InvalidQuantity as error:
                raise ValidationError({"limit": str(error)}) from error
            if not stored_exactly(units):
                raise ValidationError(
                    {"limit": f"this database stores at most {SQLITE_LIMIT_DIGITS} significant digits of a limit"}
                )
        thresholds = self.warning_thresholds
        if not isinstance(thresholds, list) or not all(
            isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 100 for value in thresholds
        ):
            raise ValidationError({"warning_thresholds": "A list of whole percentages from 1 to 100."})


def _retire_tree_rules(tenant_pk: int, using: str) -> None:
    from metering import counters

    path = Tenant.objects.using(using).filter(pk=tenant_pk).values_list("path", flat=True).first()
    if path:
        counters.bump_epochs([int(path.strip("/").split("/")[0])], using)


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


class QuotaRefusalCount(models.Model):
    """How many requests of ``tenant`` (the requesting tenant, whatever level's quota blocked) were refused for
    ``feature`` in the UTC hour starting at ``hour``: the operator's dashboard's refusals per hour. Incremented
    after each refusal was decided (``quotas.refusals``), outside the decision, so counting can never refuse or fail
    a request."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    feature = models.CharField(max_length=100)
    hour = models.DateTimeField(help_text="Start of the UTC hour.")
    count = models.PositiveBigIntegerField(default=0)

    class Meta:
        verbose_name = "quota refusal count"
        constraints = [
            models.UniqueConstraint(fields=["tenant", "feature", "hour"], name="xaas_quota_refusal_unique_hour"),
        ]
        indexes = [models.Index(fields=["hour"], name="xaas_quota_refusal_hour")]

    def __str__(self) -> str:
        return f"{self.tenant_id}:{self.feature} {self.hour:%Y-%m-%d %H}h x{self.count}"
