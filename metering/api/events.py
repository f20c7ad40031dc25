"""``POST /api/v1/events``: one event, or ``{"events": [...]}`` of up to 1,000, stored all or nothing.

Every event is checked before anything is written; if any is invalid the answer is 422 with the errors of each
bad event by index, and nothing is stored. A valid batch is recorded in one transaction through the configured
adapter's ``record_facts`` (``metering.bulk.record_many``: one multi-row insert, rollups summed per tenant x feature
x hour, the outbox rows of an outbox adapter in that same transaction); an adapter that overrides ``record_fact``
is given each fact through it instead. An event
whose ``transaction_id`` the tenant already recorded — earlier, or at a lower index of the same batch — is a
*duplicate*: reported per index, counted once, and not an error.

Ingestion is **not quota-enforced**: events report usage that already happened (as Lago's events API does), and
refusing them would lose facts and under-bill. They count towards every level's quotas from then on, so the
enforcement points (``@enforce_quota``, the middleware, ``QuotaPolicyHandler``) refuse the *next* request.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeGuard

from django.db import OperationalError, connections, transaction
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
    extend_schema_field,
)
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from metering import counters, recorder
from metering.adapters.database import DatabaseMeteringAdapter
from metering.conf import metering_settings
from metering.events import (
    UsageEvent,
    quantity_to_units,
    utcnow,
    validate_metadata,
    validate_recorded_feature,
    validate_timestamp,
    validate_transaction_id,
)
from metering.exceptions import (
    DuplicateUsageEvent,
    InvalidBatch,
    InvalidTimestamp,
    InvalidUsageEvent,
    TooManyFeatures,
)
from metering.meter import get_meter
from metering.windows import floor_hour
from tenants.authentication import TenantPrincipal
from tenants.context import TenantContext
from tenants.exceptions import TenantError, UnknownTenant
from tenants.lineage import get_context, validate_tenant_id
from tenants.models import TENANT_ID_RE, Tenant

from .base import (
    ApiView,
    FeatureField,
    QuantityField,
    TenantIdField,
    check_quantity_length,
    parse_moment,
)
from .errors import ApiError
from .schema import BODY_STATUSES, RETRY_AFTER, ClosedSerializer, error_responses

MAX_EVENTS = 1000
"""The largest ``METERING['MAX_EVENTS_PER_REQUEST']`` (its default): the body bound below is sized for it."""
TRANSACTION_ID_PATTERN = r"^[\x21-\x7e]{1,128}$"  # metering.events.TRANSACTION_ID_RE, as JSON Schema states it
EVENT_FIELDS = frozenset({"tenant_id", "feature_name", "quantity", "timestamp", "metadata", "transaction_id"})

Problems = dict[str, list[tuple[str, str]]]
# The base adapter's record_fact: an adapter (or a test) that replaces it is given each fact through its own.
_BASE_RECORD_FACT = DatabaseMeteringAdapter.record_fact


def max_events_per_request() -> int:
    """``METERING['MAX_EVENTS_PER_REQUEST']``, 1 to ``MAX_EVENTS`` (the system check ``xaas_metering.E033`` refuses
    other values; here they fall back to ``MAX_EVENTS``, the bound the body size is computed for)."""
    value = metering_settings.MAX_EVENTS_PER_REQUEST
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_EVENTS:
        return MAX_EVENTS
    return value


def max_body_bytes() -> int:
    """Room for a full batch of events with the largest metadata allowed (at least 8 MiB)."""
    return max(8 * 1024 * 1024, MAX_EVENTS * (int(metering_settings.MAX_METADATA_BYTES) + 2048))


@dataclass(frozen=True, slots=True)
class _Parsed:
    event: UsageEvent
    context: TenantContext


class _Rollback(Exception):
    pass


def outside_subtree(principal: TenantPrincipal, raw_events: list[Any]) -> dict[str, TenantError]:
    """``UnknownTenant`` for every tenant id the events name outside the key's subtree, decided in one query that
    costs the same for a tenant of another tree as for no tenant at all: no lineage is read (nor cached) for an id
    the key may not use, so a batch of 1,000 ids cannot tell which exist elsewhere by how long it takes."""
    own = principal.tenant.external_id
    # Only ids that could name a tenant (the rest are refused by validate_tenant_id, by name, without a query).
    candidates = (raw.get("tenant_id") for raw in raw_events if isinstance(raw, dict))
    named = {tenant_id for tenant_id in candidates if _may_name(tenant_id)}
    named.discard(own)
    if not named:
        return {}
    inside = set(
        Tenant.objects.filter(external_id__in=sorted(named), path__startswith=principal.tenant.path)
        .order_by()
        .values_list("external_id", flat=True)
    )
    return {tenant_id: UnknownTenant(f"unknown tenant {tenant_id!r}") for tenant_id in named - inside}


def _may_name(tenant_id: object) -> TypeGuard[str]:
    return isinstance(tenant_id, str) and TENANT_ID_RE.fullmatch(tenant_id) is not None


def _tenant_context(principal: TenantPrincipal, tenant_id: str, cache: dict[str, Any]) -> TenantContext | TenantError:
    if tenant_id not in cache:
        try:
            context = get_context(tenant_id, require_active=False)
        except TenantError as error:
            cache[tenant_id] = error
        else:
            # Outside the caller's subtree reads exactly like a tenant that does not exist.
            cache[tenant_id] = (
                context if principal.sees_context(context) else UnknownTenant(f"unknown tenant {tenant_id!r}")
            )
    found: TenantContext | TenantError = cache[tenant_id]
    return found


def parse_event(raw: object, principal: TenantPrincipal, contexts: dict[str, Any]) -> tuple[_Parsed | None, Problems]:
    """Check every field of one event (all its problems, not just the first)."""
    if not isinstance(raw, dict):
        return None, {"event": [("invalid_event", "each event must be a JSON object")]}
    problems: Problems = {}

    def problem(field: str, code: str, message: str) -> None:
        problems.setdefault(field, []).append((code, message))

    for name in sorted(str(key) for key in raw if key not in EVENT_FIELDS):
        problem(name, "unknown_field", f"unknown field {name!r}")

    tenant_id = raw.get("tenant_id", principal.tenant.external_id)
    context: TenantContext | None = None
    try:
        tenant_id = validate_tenant_id(tenant_id)
    except TenantError as error:  # InvalidTenantId
        problem("tenant_id", error.code, str(error))
    else:
        found = _tenant_context(principal, tenant_id, contexts)
        if isinstance(found, TenantError):
            problem("tenant_id", found.code, str(found))
        elif not found.is_active:
            problem("tenant_id", "inactive_tenant", f"tenant {tenant_id!r} or an ancestor is deactivated")
        else:
            context = found

    feature = raw.get("feature_name")
    if feature is None:
        problem("feature_name", "required", "feature_name is required")
    else:
        try:
            validate_recorded_feature(feature)
        except InvalidUsageEvent as error:
            problem("feature_name", error.code, str(error))

    quantity = raw.get("quantity")
    if quantity is None:
        problem("quantity", "required", "quantity is required")
    else:
        try:
            quantity_to_units(check_quantity_length(quantity))
        except InvalidUsageEvent as error:
            problem("quantity", error.code, str(error))

    timestamp = utcnow()
    if raw.get("timestamp") is not None:
        try:
            timestamp = validate_timestamp(parse_moment(raw["timestamp"], allow_epoch=True))
        except ValueError as error:  # InvalidTimestamp is a ValueError too
            problem("timestamp", getattr(error, "code", InvalidTimestamp.code), str(error))

    metadata = raw.get("metadata")
    try:
        # null means "no metadata" (declared nullable in the schema), whatever the Python API makes of None.
        metadata = validate_metadata({} if metadata is None else metadata)
    except InvalidUsageEvent as error:
        problem("metadata", error.code, str(error))

    transaction_id = raw.get("transaction_id")
    if transaction_id is None:
        problem("transaction_id", "required", "transaction_id is required: it makes retries safe")
    else:
        try:
            validate_transaction_id(transaction_id)
        except InvalidUsageEvent as error:
            problem("transaction_id", error.code, str(error))

    if problems or context is None:
        return None, problems
    assert isinstance(feature, str) and isinstance(metadata, dict)
    assert isinstance(quantity, Decimal | int | float | str)  # quantity_to_units accepted it
    event = UsageEvent(
        tenant_id=context.tenant_id,
        feature_name=feature,
        quantity=quantity,
        timestamp=timestamp,
        metadata=metadata,
        transaction_id=transaction_id,
    )
    return _Parsed(event, context), problems


MAX_ATTEMPTS = 3
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock detected, serialization failure


def _retryable(error: OperationalError) -> bool:
    return getattr(error.__cause__, "sqlstate", None) in RETRYABLE_SQLSTATES


def _lock_order(item: _Parsed) -> tuple[int, str, datetime, str, str]:
    event, context = item.event, item.context
    return (context.root.pk, event.feature_name, floor_hour(event.timestamp), context.path, str(event.transaction_id))


@contextmanager
def _features_admitted(
    principal: TenantPrincipal,
    parsed: list[_Parsed],
    order: list[int],
    features: set[tuple[int, str]],
    problems: dict[int, Problems],
    using: str,
) -> Iterator[None]:
    """The batch's new features admitted at once, within the tree's budget and the key's
    (``recorder.admit_features_for_key``); a refused one is reported at each index that carries it."""
    try:
        with recorder.features_admitted(features, using):
            for root_pk in sorted({root_pk for root_pk, _ in features}):
                names = {feature for root, feature in features if root == root_pk}
                recorder.admit_features_for_key(principal.tenant.pk, root_pk, names, using)
            yield
    except TooManyFeatures as error:
        for index in order:
            item = parsed[index]
            if (item.context.root.pk, item.event.feature_name) == (error.root_pk, error.feature_name):
                problems[index] = {error.field: [(error.code, str(error))]}
        raise _Rollback() from None


def _validation_errors(problems: dict[int, Problems], count: int) -> ApiError:
    details = {str(i): {field: [code for code, _ in items] for field, items in p.items()} for i, p in problems.items()}
    messages = {
        str(i): {field: [message for _, message in items] for field, items in p.items()} for i, p in problems.items()
    }
    first = min(problems)
    return ApiError(
        422,
        "validation_errors",
        f"{len(problems)} of {count} event(s) are invalid (first: index {first}); nothing was stored",
        "events",
        details=details,
        messages=messages,
    )


# ---- schema-only serializers ----


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "format": "date-time", "maxLength": 64, "nullable": True},
            {"type": "number"},
        ],
        "description": "ISO-8601 with a UTC offset (2025-01-31T12:00:00Z) or Unix seconds. Default (or null): now. "
        "Not more than FUTURE_TOLERANCE_SECONDS in the future.",
    }
)
class EventTimestampField(serializers.JSONField):
    """Schema only: the events endpoint parses timestamps itself (``parse_event``)."""


class EventSerializer(ClosedSerializer):
    tenant_id = TenantIdField(required=False)
    feature_name = FeatureField()
    quantity = QuantityField()
    timestamp = EventTimestampField(required=False)
    metadata = serializers.DictField(
        required=False,
        allow_null=True,
        help_text="A JSON object of at most MAX_METADATA_BYTES once encoded; null is the same as no metadata.",
    )
    transaction_id = serializers.RegexField(
        TRANSACTION_ID_PATTERN,
        max_length=128,
        help_text="Idempotency key: the same one for the same tenant is stored once (retries are safe).",
    )


class EventBatchSerializer(ClosedSerializer):
    events = serializers.ListField(
        child=EventSerializer(),
        min_length=1,
        max_length=MAX_EVENTS,
        help_text=f"1 to {MAX_EVENTS} events, stored all or nothing.",
    )


class EventResultSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    status = serializers.ChoiceField(choices=["created", "duplicate"])
    tenant_id = serializers.CharField()
    transaction_id = serializers.CharField()


class EventsResponseSerializer(serializers.Serializer):
    created = serializers.IntegerField()
    duplicates = serializers.IntegerField()
    results = EventResultSerializer(many=True)


class EventsView(ApiView):
    def max_body_bytes(self) -> int:
        return max_body_bytes()

    @extend_schema(
        operation_id="events_create",
        summary="Record usage events",
        description=__doc__,
        request=PolymorphicProxySerializer(
            component_name="EventOrBatch",
            serializers=[EventSerializer, EventBatchSerializer],
            resource_type_field_name=None,
        ),
        responses={
            201: OpenApiResponse(EventsResponseSerializer, description="At least one event was stored."),
            200: OpenApiResponse(EventsResponseSerializer, description="Every event was a duplicate."),
            **error_responses(*BODY_STATUSES, 422),
        },
        parameters=[RETRY_AFTER],
        examples=[
            OpenApiExample(
                "One event",
                request_only=True,
                value={
                    "tenant_id": "acme-chat-key-1",
                    "feature_name": "llm_tokens",
                    "quantity": "120",
                    "timestamp": "2025-01-31T12:00:00Z",
                    "metadata": {"model": "gpt-x"},
                    "transaction_id": "req-7f3a",
                },
            ),
            OpenApiExample(
                "Invalid batch",
                response_only=True,
                status_codes=["422"],
                value={
                    "error": {
                        "code": "validation_errors",
                        "field": "events",
                        "message": "1 of 4 event(s) are invalid (first: index 3); nothing was stored",
                        "details": {"3": {"quantity": ["invalid_quantity"]}},
                        "messages": {"3": {"quantity": ["quantity must be finite, got 'NaN'"]}},
                    }
                },
            ),
        ],
        tags=["events"],
    )
    def post(self, request: Request) -> Response:
        length = str(request.META.get("CONTENT_LENGTH") or "0")
        limit = max_body_bytes()
        if re.fullmatch(r"[0-9]+", length) and int(length) > limit:
            raise ApiError(413, "payload_too_large", f"the body must be at most {limit} bytes", "body")
        body = request.data
        if not isinstance(body, dict) or not body:
            raise ApiError(400, "invalid_body", 'the body must be an event object or {"events": [...]}', "body")
        if "events" in body:
            extra = sorted(str(key) for key in body if key != "events")
            if extra:
                raise ApiError(400, "unknown_field", f"a batch holds only 'events', not {extra[0]!r}", extra[0])
            raw_events = body["events"]
            if not isinstance(raw_events, list):
                raise ApiError(400, "invalid_events", "events must be a list of event objects", "events")
            if not raw_events:
                raise ApiError(400, "empty_batch", "events must hold at least one event", "events")
            most = max_events_per_request()
            if len(raw_events) > most:
                raise ApiError(
                    400,
                    "too_many_events",
                    f"at most {most} events per request (METERING['MAX_EVENTS_PER_REQUEST']), got {len(raw_events)}",
                    "events",
                )
        else:
            raw_events = [body]
        return self._record(raw_events)

    def _record(self, raw_events: list[Any]) -> Response:
        principal = self.principal
        contexts: dict[str, Any] = dict(outside_subtree(principal, raw_events))
        parsed: list[_Parsed] = []
        problems: dict[int, Problems] = {}
        for index, raw in enumerate(raw_events):
            item, found = parse_event(raw, principal, contexts)
            if found:
                problems[index] = found
            elif item is not None:
                parsed.append(item)
        if problems:
            raise _validation_errors(problems, len(raw_events))

        meter = get_meter()
        record_fact = getattr(meter, "record_fact", None)
        if record_fact is None:
            raise ApiError(
                503,
                "unsupported_adapter",
                "METERING['ADAPTER'] must store facts in this database (DatabaseMeteringAdapter or a subclass)",
            )
        if getattr(type(meter), "record_fact", None) is _BASE_RECORD_FACT and hasattr(meter, "record_facts"):
            created = self._record_batch(meter, principal, parsed, problems, len(raw_events))
        else:
            # An adapter with its own ``record_fact`` (per-fact work) is given every fact, one at a time.
            created = self._record_each(record_fact, principal, parsed, problems, len(raw_events))
        results = [
            {
                "index": index,
                "status": "created" if index in created else "duplicate",
                "tenant_id": item.event.tenant_id,
                "transaction_id": item.event.transaction_id,
            }
            for index, item in enumerate(parsed)
        ]
        return Response(
            {"created": len(created), "duplicates": len(results) - len(created), "results": results},
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )

    def _record_each(
        self,
        record_fact: Any,
        principal: TenantPrincipal,
        parsed: list[_Parsed],
        problems: dict[int, Problems],
        count: int,
    ) -> set[int]:
        using = metering_settings.DATABASE_ALIAS
        # The first occurrence of a (tenant, transaction id) in the batch is recorded; later ones are duplicates.
        first: dict[tuple[int, str], int] = {}
        for index, item in enumerate(parsed):
            assert item.event.transaction_id is not None
            first.setdefault((item.context.tenant.pk, item.event.transaction_id), index)
        # Written in one global order (tree, feature, hour, tenant, transaction id), not the request's: two batches
        # touching the same rollup rows then lock them in the same order and queue instead of deadlocking.
        order = sorted(first.values(), key=lambda index: _lock_order(parsed[index]))
        features = {(parsed[index].context.root.pk, parsed[index].event.feature_name) for index in order}
        nested = connections[using].in_atomic_block  # inside a caller's transaction nothing can be retried
        for attempt in range(1, MAX_ATTEMPTS + 1):
            created: set[int] = set()
            roots: set[int] = set()
            try:
                with (
                    transaction.atomic(using=using),
                    _features_admitted(principal, parsed, order, features, problems, using),
                ):
                    for index in order:
                        item = parsed[index]
                        try:
                            record_fact(item.event, context=item.context)
                        except DuplicateUsageEvent:
                            continue
                        except (InvalidUsageEvent, TenantError) as error:
                            # The tree changed since validation (a tenant deactivated or removed meanwhile).
                            problems[index] = {error.field: [(error.code, str(error))]}
                            continue
                        roots.add(item.context.root.pk)
                        created.add(index)
                    if problems:
                        raise _Rollback()
            except BaseException as error:
                # Live Redis counters were incremented inside the rolled-back transaction: retire them (rebuilt
                # from the database on next use) rather than leave an over-count behind.
                if roots:
                    counters.forget_trees(roots)
                if problems:
                    raise _validation_errors(problems, count) from None
                if isinstance(error, OperationalError) and _retryable(error) and not nested and attempt < MAX_ATTEMPTS:
                    continue  # a deadlock or serialization failure with another writer: the batch runs again
                raise
            break
        return created

    def _record_batch(
        self, meter: Any, principal: TenantPrincipal, parsed: list[_Parsed], problems: dict[int, Problems], count: int
    ) -> set[int]:
        """The whole batch in one transaction (``metering.bulk.record_many``): one multi-row insert, rollups summed
        per tenant x feature x hour, no savepoint or lock per event."""

        def admit(pairs: set[tuple[int, str]], using: str) -> None:
            for root_pk in sorted({root_pk for root_pk, _ in pairs}):
                names = {feature for root, feature in pairs if root == root_pk}
                recorder.admit_features_for_key(principal.tenant.pk, root_pk, names, using)

        try:
            result = meter.record_facts(
                [item.event for item in parsed], contexts=[item.context for item in parsed], admit=admit
            )
        except InvalidBatch as error:
            problems.update(error.problems)
            raise _validation_errors(problems, count) from None
        return set(result.created)
