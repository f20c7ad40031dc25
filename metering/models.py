"""Usage facts (immutable) and their hourly rollups over every level of the lineage."""

from __future__ import annotations

from decimal import Decimal

from django.db import models

from tenants.models import Tenant

from .events import units_to_quantity


class UsageRecord(models.Model):
    """One accepted usage fact. Never edited: a correction is a new fact."""

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="usage_records")
    feature = models.CharField(max_length=100)
    units = models.BigIntegerField(help_text="Quantity in millionths (10**-6) of a unit, exact.")
    timestamp = models.DateTimeField(help_text="When the usage happened (UTC).")
    transaction_id = models.CharField(max_length=128, help_text="Idempotency key, unique per tenant.")
    metadata = models.JSONField(default=dict, blank=True)
    recorded_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "usage record"
        constraints = [
            models.UniqueConstraint(fields=["tenant", "transaction_id"], name="xaas_usage_unique_transaction"),
        ]
        indexes = [
            models.Index(fields=["tenant", "feature", "timestamp"], name="xaas_usage_tenant_feature_ts"),
            models.Index(fields=["timestamp"], name="xaas_usage_ts"),
        ]

    def __str__(self) -> str:
        return f"{self.feature} {self.quantity} @ {self.timestamp:%Y-%m-%d %H:%M:%S}"

    @property
    def quantity(self) -> Decimal:
        return units_to_quantity(self.units)


class UsageRollup(models.Model):
    """Usage of a tenant's whole subtree for one feature in one UTC hour, kept in the fact's transaction."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="usage_rollups")
    feature = models.CharField(max_length=100)
    bucket = models.DateTimeField(help_text="Start of the UTC hour.")
    units = models.BigIntegerField(default=0)
    events = models.BigIntegerField(default=0)

    class Meta:
        verbose_name = "usage rollup"
        constraints = [
            models.UniqueConstraint(fields=["tenant", "feature", "bucket"], name="xaas_rollup_unique_bucket"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id}:{self.feature}@{self.bucket:%Y-%m-%d %H:00}"

    @property
    def quantity(self) -> Decimal:
        return units_to_quantity(self.units)
