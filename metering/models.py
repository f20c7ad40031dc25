"""Usage facts (immutable) and their hourly rollups over every level of the lineage."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db import models

from tenants.models import Tenant

from .events import units_to_quantity
from .exceptions import InvalidFeatureDefinition, InvalidUsageEvent
from .features import MAX_PROPERTY_LENGTH, MAX_UNIT_LENGTH, Aggregation, FeatureSpec, validate_definition
from .features import forget as forget_features


class UsageRecord(models.Model):
    """One accepted usage fact. Never edited: a correction is a new fact."""

    # No index of its own: the unique (tenant, transaction_id) constraint and the (tenant, feature, timestamp)
    # index both start with tenant.
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="usage_records", db_index=False)
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


class UnitsField(models.BigIntegerField):
    """Integer units summed over many facts: ``numeric(38,0)`` on PostgreSQL, so a rollup row is exact far beyond
    64 bits (writers bound a slot row to 10**36 - 1 units, so an hour's sum of slots stays within 10**38 - 1: more
    facts than any database can write in an hour at the largest quantity), a 64-bit integer elsewhere (SQLite: a
    row that would pass 2**63 - 1 refuses the fact, see ``metering.rollups``). Read as a Python ``int`` on every
    backend."""

    def db_type(self, connection: Any) -> str | None:
        if connection.vendor == "postgresql":
            return "numeric(38,0)"
        return super().db_type(connection)

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> int | None:
        return None if value is None else int(value)

    def get_placeholder(self, value: Any, compiler: Any, connection: Any) -> str:
        # One placeholder per value: its presence keeps Django's PostgreSQL bulk_create from sending the column as
        # one array (UNNEST), which psycopg's client-side binding types as bigint[] and so refuses values past 64
        # bits (reconcile's packed rows can hold up to 10**36).
        return "%s"


class UsageRollup(models.Model):
    """Usage of a tenant's whole subtree for one feature in one UTC hour, kept in the fact's transaction.

    One (tenant, feature, hour) is split over up to ``rollups.SLOT_ROWS`` rows, its *slots*; its usage is the sum of
    them. On PostgreSQL each transaction adds to one slot chosen from its transaction id (slots 1 to
    ``METERING["ROLLUP_SLOTS"]``), so concurrent writers of one tree do not queue on one row; slot 0 holds what
    ``rollups.fold`` merged (hours that are over) and is the only slot on SQLite. See ``metering.rollups``.
    """

    # No index of its own: the unique (tenant, feature, bucket, slot) constraint serves every lookup, and a narrower
    # tenant-only index tempts the planner into reading a tenant's whole history.
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="usage_rollups", db_index=False)
    feature = models.CharField(max_length=100)
    bucket = models.DateTimeField(help_text="Start of the UTC hour.")
    slot = models.SmallIntegerField(
        default=0, db_default=0, help_text="Which of the hour's rows (their sum is the hour's usage)."
    )
    units = UnitsField(default=0)
    events = models.BigIntegerField(default=0)

    class Meta:
        verbose_name = "usage rollup"
        constraints = [
            models.UniqueConstraint(fields=["tenant", "feature", "bucket", "slot"], name="xaas_rollup_unique_slot"),
            # rollups.SLOT_ROWS: with every row within its bound, no hour's sum passes the exact range.
            models.CheckConstraint(condition=models.Q(slot__gte=0, slot__lt=100), name="xaas_rollup_slot_range"),
        ]
        indexes = [
            # The rows rollups.fold has to merge, and only those: small, and found without reading the history.
            models.Index(fields=["bucket"], name="xaas_rollup_unfolded", condition=models.Q(slot__gt=0)),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id}:{self.feature}@{self.bucket:%Y-%m-%d %H:00}#{self.slot}"

    @property
    def quantity(self) -> Decimal:
        return units_to_quantity(self.units)


class CounterEpoch(models.Model):
    """The generation of a tree's Redis counters (``metering.counters``): part of every counter's key.

    Bumped in the transaction of any write or decision that Redis did not see (Redis unreachable, a subtree moved,
    rollups repaired), so once it commits no decision can use the counters of the generation before — however Redis
    comes back (restarted with its old data, or never flushed). ``owner`` is the namespace whose counters follow
    every write of the tree (``counters.counter_owner``); a process of any other owner claims the tree before it
    writes or decides. No row: nobody's counters yet (the first write claims the tree).
    """

    root = models.OneToOneField(Tenant, on_delete=models.CASCADE, primary_key=True, related_name="+")
    epoch = models.BigIntegerField(default=0)
    owner = models.CharField(max_length=40, default="", blank=True)

    class Meta:
        verbose_name = "counter epoch"

    def __str__(self) -> str:
        return f"tree {self.root_id}: epoch {self.epoch}"


class UsageOutbox(models.Model):
    """A fact waiting for (or done with) delivery to the configured sink, written in the fact's own transaction.

    ``pending`` rows are claimed in batches (``next_attempt_at`` doubles as the claim's lease), ``delivered`` and
    ``dead`` are final until an operator resends, ``held`` waits for a Lago subscription on the tenant's lineage.
    """

    class State(models.TextChoices):
        PENDING = "pending", "pending"
        DELIVERED = "delivered", "delivered"
        DEAD = "dead", "dead (rejected)"
        HELD = "held", "held (no subscription)"

    # One row per fact and sink (METERING["SINKS"]): each sink's state, retries and dead letters are its own.
    record = models.ForeignKey(UsageRecord, on_delete=models.CASCADE, related_name="outbox_rows")
    sink = models.CharField(max_length=20, help_text="Which sink delivers it: lago, webhook, clickhouse, ...")
    state = models.CharField(max_length=10, choices=State.choices, default=State.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(help_text="Due from then on; a claimed row is leased until then.")
    claim_token = models.CharField(max_length=32, blank=True, default="", editable=False)
    external_subscription_id = models.CharField(
        max_length=255, blank=True, default="", help_text="Frozen at the first attempt, so every resend is identical."
    )
    body = models.TextField(
        blank=True,
        default="",
        editable=False,
        help_text="The exact JSON the sink is sent for this fact, fixed at the first send: every resend sends it "
        "unchanged (settings changes apply to new facts only).",
    )
    server_errors = models.PositiveIntegerField(
        default=0,
        help_text="5xx answers to batches holding this fact: past SINK_BISECT_AFTER its batches are split.",
    )
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "usage outbox entry"
        verbose_name_plural = "usage outbox"
        constraints = [models.UniqueConstraint(fields=["record", "sink"], name="xaas_outbox_record_sink")]
        indexes = [
            models.Index(
                fields=["sink", "next_attempt_at", "id"],
                name="xaas_outbox_due",
                condition=models.Q(state="pending"),
            ),
            # Small: only the rows that need an operator. Counting delivered rows scans the table.
            models.Index(
                fields=["sink", "state"],
                name="xaas_outbox_attention",
                condition=models.Q(state__in=["dead", "held"]),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.sink} #{self.record_id} ({self.state})"


class SinkState(models.Model):
    """Per-sink delivery health. ``blocked_at`` set: delivery stopped (401/403/404) until the configuration changes
    or an operator resumes it, instead of burning retries."""

    sink = models.CharField(max_length=20, unique=True)
    blocked_at = models.DateTimeField(null=True, blank=True)
    blocked_status = models.PositiveSmallIntegerField(null=True, blank=True)
    blocked_reason = models.TextField(blank=True, default="")
    config_fingerprint = models.CharField(
        max_length=32, blank=True, default="", help_text="Hash of the URL and credentials delivery was blocked with."
    )
    last_success_at = models.DateTimeField(null=True, blank=True)
    last_failure_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")

    class Meta:
        verbose_name = "delivery sink"

    def __str__(self) -> str:
        return f"{self.sink} ({'blocked' if self.blocked_at else 'ok'})"


class LogCursor(models.Model):
    """Log mode (``METERING["WRITE_MODE"] = "log"``): how far the drainer has persisted a tree's Redis stream.

    ``generation`` names the stream (a random id written into Redis when the tree's log was opened); ``last_entry``
    is the id of the last stream entry whose fact is committed here, advanced in the same transaction as the facts.
    A drainer holds this row ``FOR UPDATE`` while it persists a batch, so one tree is drained by one drainer at a
    time and a crashed drainer's batch is simply redone by the next (nothing was committed). If Redis comes back
    without the stream of ``generation``, the entries after ``last_entry`` may be lost: a ``LogGap`` says so.
    """

    root = models.OneToOneField(Tenant, on_delete=models.CASCADE, primary_key=True, related_name="+")
    generation = models.CharField(max_length=32, default="", blank=True)
    last_entry = models.CharField(
        max_length=40, default="0-0", help_text="Redis stream id of the last persisted entry."
    )
    last_drained_at = models.DateTimeField(null=True, blank=True)
    facts = models.BigIntegerField(default=0, help_text="Facts persisted from this tree's streams so far.")

    class Meta:
        verbose_name = "log drain cursor"

    def __str__(self) -> str:
        return f"tree {self.root_id}: {self.generation or '-'} @ {self.last_entry}"


class LogGap(models.Model):
    """Log mode: a tree's stream was found missing in Redis (a new empty server, a flush, a restore from an old
    backup) while the database says entries of it were expected. Facts appended after ``after_entry`` of
    ``generation`` and not persisted may be lost; the counters were rebuilt from the database."""

    root = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    generation = models.CharField(max_length=32)
    after_entry = models.CharField(max_length=40)
    last_drained_at = models.DateTimeField(null=True, blank=True, help_text="Facts after this moment may be missing.")
    detected_at = models.DateTimeField(auto_now_add=True)
    note = models.TextField(blank=True, default="")

    class Meta:
        verbose_name = "log gap"

    def __str__(self) -> str:
        return f"tree {self.root_id}: after {self.after_entry} of {self.generation}"


class LogDeadEntry(models.Model):
    """Log mode: a stream entry that cannot become a fact (undecodable, invalid, or its tenant no longer exists).
    Kept here for the operator, with the entry's raw fields, so it never blocks its stream and is never dropped
    silently; its units were given back to the live counters (they were counted when it was admitted)."""

    root = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    generation = models.CharField(max_length=32)
    entry_id = models.CharField(max_length=40)
    fields = models.JSONField(default=dict, blank=True, help_text="The entry's fields as they were in the stream.")
    reason = models.TextField()
    detected_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "log dead entry"
        verbose_name_plural = "log dead entries"
        constraints = [
            models.UniqueConstraint(fields=["root", "generation", "entry_id"], name="xaas_log_dead_entry_unique"),
        ]

    def __str__(self) -> str:
        return f"tree {self.root_id}: {self.entry_id} ({self.reason})"


class FeatureDefinition(models.Model):
    """A registered feature: its unit and how its facts aggregate (``metering.features``). Unregistered features
    are sums. The aggregation, property and roll-up are fixed once saved; unit and description may change."""

    name = models.CharField(max_length=100, unique=True)
    aggregation = models.CharField(max_length=12, choices=Aggregation.choices, default=Aggregation.SUM)
    unit = models.CharField(max_length=MAX_UNIT_LENGTH, blank=True, help_text='What one unit is: "tokens", "GB" …')
    property_name = models.CharField(
        "property",
        max_length=MAX_PROPERTY_LENGTH,
        blank=True,
        help_text="unique_count only: the metadata key whose distinct values are counted (e.g. user_id).",
    )
    rolls_up = models.BooleanField(
        default=True,
        help_text="Gauges only: a level's gauge is the sum of its children's current levels (off: its own facts).",
    )
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "feature"
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.aggregation}{', ' + self.unit if self.unit else ''})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        super().save(*args, **kwargs)
        forget_features()

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        deleted = super().delete(*args, **kwargs)
        forget_features()
        return deleted

    def spec(self) -> FeatureSpec:
        return FeatureSpec(
            name=self.name,
            aggregation=self.aggregation,
            unit=self.unit,
            property_name=self.property_name,
            rolls_up=self.rolls_up,
            registered=True,
        )

    def full_clean_definition(self, existing: FeatureDefinition | None = None) -> None:
        """Validate the fields and that a saved definition keeps its aggregation, property and roll-up. Raises
        ``InvalidFeatureDefinition`` naming the field."""
        validate_definition(self.name, self.aggregation, self.unit, self.property_name, self.rolls_up)
        if existing is None and self.pk is not None:
            existing = FeatureDefinition.objects.filter(pk=self.pk).first()
        if existing is not None:
            for field in ("name", "aggregation", "property_name", "rolls_up"):
                if getattr(existing, field) != getattr(self, field):
                    raise InvalidFeatureDefinition(
                        f"{field} of a registered feature cannot change (facts were counted under it); "
                        "register a new feature instead",
                        field=field,
                    )

    def clean(self) -> None:
        from django.core.exceptions import ValidationError

        try:
            self.full_clean_definition()
        except InvalidUsageEvent as error:  # InvalidFeatureName too
            field = {"feature_name": "name", "property": "property_name"}.get(error.field, error.field)
            raise ValidationError({field: str(error)}) from error
