"""Lago's batch events API: ``POST {SINK_URL}/api/v1/events/batch`` with ``{"events": [...]}``, Bearer auth.

The event is built from the stored fact alone, deterministically, so every resend is the same event:

- ``transaction_id``: ``"<tenant id>/<fact transaction id>"`` (Lago keeps it unique per subscription, and tenants
  of one subtree share their ancestor's subscription; tenant ids cannot hold ``/``, so the join is injective).
  ``LAGO_QUALIFY_TRANSACTION_ID = False`` sends the fact's key alone.
- ``external_subscription_id``: frozen on the outbox row at the first attempt (tenant's own, else nearest ancestor's).
- ``code`` and the quantity's property: ``LAGO_METRICS[feature]``, defaults the feature name and
  ``LAGO_QUANTITY_PROPERTY``. The quantity is exact: a JSON integer when whole, else a decimal string.
- ``timestamp``: Unix seconds as a string with milliseconds (the fact's microseconds are truncated).
- ``properties``: the fact's metadata (all of it, none, or the listed keys) plus the quantity, which wins a clash.
  Lago's schema allows string and number values only (``schema_value``): strings and finite numbers are sent as
  they are, ``true``/``false`` as the strings ``"true"``/``"false"``, a list or an object as its compact JSON text
  (keys sorted), and a ``null`` is left out.

The event is encoded once, at the fact's first claim, and stored on its outbox row (``UsageOutbox.body``): every
resend sends those exact bytes, so a settings change between a lost answer and its resend cannot make a second
event (Lago's ClickHouse store keys an event on its code, subscription, timestamp and transaction id).

Responses: 200 delivered; 422 ``error_details`` keyed by index, each a field map or a string (``"expression_
evaluation_failed: ..."``): ``value_already_exist`` on ``transaction_id`` says that Lago holds *an* event with that
id, so the bridge asks Lago which (``GET /api/v1/events/{transaction_id}``): the same subscription, code and
properties is delivered, another one is a conflict (dead-lettered), none or no answer is retried later. Anything
else dead-letters that event; the rest is sent again at once (a batch is all-or-nothing). 401/403 block delivery;
429/5xx/network errors are retried.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar
from urllib.parse import quote, urlencode, urlparse

from django.core.checks import CheckMessage, Warning

from ...conf import metering_settings
from ...events import units_to_quantity
from ..outbox import ClaimedFact
from .base import Check, Confirmation, Outcome, SendResult, Sink, encode

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MILLISECOND = Decimal("0.001")
BATCH_PATH = "/api/v1/events/batch"
EVENT_PATH = "/api/v1/events/"
LIST_PATH = "/api/v1/events"
SUBSCRIPTION_PATH = "/api/v1/subscriptions/"


def schema_value(value: Any) -> str | int | float | None:
    """``value`` as Lago's schema allows a property (string or number); ``None``: leave the property out."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def lago_timestamp(moment: datetime) -> str:
    """Unix seconds with exactly three decimals, e.g. ``"1651240791.123"`` (exact: integer arithmetic)."""
    delta = moment - EPOCH
    milliseconds = (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
    return str((Decimal(milliseconds) / 1000).quantize(MILLISECOND))


def quantity_value(units: int) -> int | str:
    """The exact quantity for JSON: an integer when whole, else its decimal string (never a binary float)."""
    quantity = units_to_quantity(units)
    return int(quantity) if quantity == quantity.to_integral_value() else str(quantity)


def metric_for(feature: str) -> tuple[str, str, bool | list[str]]:
    """(code, quantity property, metadata policy) of ``feature`` from ``LAGO_METRICS``."""
    entry = (metering_settings.LAGO_METRICS or {}).get(feature)
    default_property = str(metering_settings.LAGO_QUANTITY_PROPERTY)
    if entry is None:
        return feature, default_property, True
    if isinstance(entry, str):
        return entry, default_property, True
    return (
        str(entry.get("code") or feature),
        str(entry.get("property") or default_property),
        entry.get("metadata", True),
    )


class LagoSink(Sink):
    name = "lago"
    needs_subscription: ClassVar[bool] = True
    secret_setting = "API_KEY"  # noqa: S105 (a setting's name)

    @classmethod
    def system_checks(cls) -> list[CheckMessage]:
        messages: list[CheckMessage] = []
        if metering_settings.SINK_URL and urlparse(str(metering_settings.SINK_URL)).password:
            messages.append(
                Warning(
                    "METERING['SINK_URL'] holds a password, which the Lago sink ignores (it authenticates by API_KEY).",
                    id="xaas_metering.W011",
                )
            )
        batch_size = metering_settings.BATCH_SIZE
        if isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size > 100:
            messages.append(
                Warning(
                    f"METERING['BATCH_SIZE'] = {batch_size}: a default Lago refuses batches of more than 100 events.",
                    hint="Keep it at 100 unless your Lago's limit was raised.",
                    id="xaas_metering.W010",
                )
            )
        return messages

    def build(self, fact: ClaimedFact) -> dict[str, Any]:
        code, quantity_property, metadata_policy = metric_for(fact.feature)
        if metadata_policy is True:
            properties = dict(fact.metadata)
        elif metadata_policy is False:
            properties = {}
        else:
            properties = {key: fact.metadata[key] for key in metadata_policy if key in fact.metadata}
        properties = {key: mapped for key, value in properties.items() if (mapped := schema_value(value)) is not None}
        properties[quantity_property] = quantity_value(fact.units)
        transaction_id = fact.transaction_id
        if metering_settings.LAGO_QUALIFY_TRANSACTION_ID:
            transaction_id = f"{fact.tenant_id}/{transaction_id}"
        return {
            "transaction_id": transaction_id,
            "external_subscription_id": fact.subscription,
            "code": code,
            "timestamp": lago_timestamp(fact.timestamp),
            "properties": properties,
        }

    def batch_key(self, event: dict[str, Any]) -> str | None:
        return str(event.get("transaction_id"))

    def confirm(self, event: dict[str, Any]) -> Check:
        """Ask Lago which event it holds under ``event``'s transaction_id (lago-api ``EventsController#show``)."""
        from ..reconcile_lago import LagoUnavailable

        url, _ = self.endpoint(EVENT_PATH + quote(str(event["transaction_id"]), safe=""))
        response = self.get(url, {"Authorization": f"Bearer {self.secret}", "Accept": "application/json"})
        if isinstance(response, SendResult):
            return Check(Confirmation.UNKNOWN, response.error)
        if response.status_code == 404:
            return Check(Confirmation.UNKNOWN, "404: Lago holds no event with this transaction_id")
        if response.status_code != 200:
            return Check(Confirmation.UNKNOWN, f"{response.status_code} {self.excerpt(response, 200)}")
        try:
            held = response.json()["event"]
            differences = event_differences(held, event)
        except (ValueError, KeyError, TypeError, AttributeError):
            return Check(Confirmation.UNKNOWN, f"unreadable event: {self.excerpt(response, 200)}")
        moment = lago_instant(event.get("timestamp"))
        if "external_subscription_id" in differences and moment is not None:
            # `show` finds one event by organization and transaction_id; with unqualified ids another subscription
            # may hold the id too. Look for it in this event's own subscription, at its own millisecond.
            try:
                ours = [
                    candidate
                    for candidate in self.list_events(
                        str(event.get("external_subscription_id") or ""), str(event["code"]), moment, moment
                    )
                    if str(candidate.get("transaction_id")) == str(event["transaction_id"])
                ]
            except LagoUnavailable as error:
                return Check(Confirmation.UNKNOWN, str(error))
            if ours:
                held = ours[0]
                differences = event_differences(held, event)
        if not differences:
            return Check(Confirmation.HELD)
        theirs = {name: held.get(name) for name in ("external_subscription_id", "code", "timestamp", "properties")}
        return Check(
            Confirmation.CONFLICT,
            f"Lago holds transaction_id {event['transaction_id']!r} for another event (differs in "
            f"{', '.join(differences)}: {json.dumps(theirs, sort_keys=True, ensure_ascii=False)[:300]})",
        )

    def list_events(self, subscription: str, code: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """Every event Lago holds for ``subscription`` and ``code`` with a timestamp from ``start`` to ``end``
        (inclusive, to the millisecond): ``GET /api/v1/events`` (lago-api ``EventsController#index``), all pages.
        ``LagoUnavailable`` when Lago does not answer usably."""
        from ..reconcile_lago import LagoUnavailable

        events: list[dict[str, Any]] = []
        page: int | None = 1
        while page is not None:
            query = urlencode(
                {
                    "external_subscription_id": subscription,
                    "code": code,
                    "timestamp_from": iso_milliseconds(start),
                    "timestamp_to": iso_milliseconds(end),
                    "per_page": 100,
                    "page": page,
                }
            )
            url, _ = self.endpoint(f"{LIST_PATH}?{query}")
            response = self.get(url, {"Authorization": f"Bearer {self.secret}", "Accept": "application/json"})
            if isinstance(response, SendResult):
                raise LagoUnavailable(f"listing {subscription} {code}: {response.error}")
            if response.status_code != 200:
                raise LagoUnavailable(f"listing {subscription} {code}: {response.status_code} {self.excerpt(response)}")
            try:
                payload = response.json()
                events.extend(payload["events"])
                next_page = payload.get("meta", {}).get("next_page")
            except (ValueError, KeyError, TypeError, AttributeError):
                raise LagoUnavailable(f"listing {subscription} {code}: unreadable answer") from None
            page = int(next_page) if next_page and int(next_page) > page else None
        return events

    def subscription_boundaries(self, subscription: str) -> tuple[datetime | None, datetime | None] | None:
        """(started_at, terminated_at) of a Lago subscription (``GET /api/v1/subscriptions/{external_id}``), or
        ``None`` when Lago does not describe it."""
        url, _ = self.endpoint(SUBSCRIPTION_PATH + quote(subscription, safe=""))
        response = self.get(url, {"Authorization": f"Bearer {self.secret}", "Accept": "application/json"})
        if isinstance(response, SendResult) or response.status_code != 200:
            return None
        try:
            found = response.json()["subscription"]
            return tuple(  # type: ignore[return-value]
                datetime.fromisoformat(str(found[name]).replace("Z", "+00:00")) if found.get(name) else None
                for name in ("started_at", "terminated_at")
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def send(self, events: list[dict[str, Any]]) -> SendResult:
        headers = {"Authorization": f"Bearer {self.secret}", "Content-Type": "application/json"}
        url, _ = self.endpoint(BATCH_PATH)  # Lago authenticates by API key only: URL credentials are ignored
        response = self.post(url, encode({"events": events}), headers)
        if isinstance(response, SendResult):
            return response
        if 200 <= response.status_code < 300:
            return SendResult(Outcome.OK, response.status_code)
        common = self.classify_status(response)
        if common is not None:
            return common
        if response.status_code == 422:
            return self._unprocessable(response, len(events))
        return SendResult(Outcome.REJECTED, response.status_code, f"{response.status_code} {self.excerpt(response)}")

    def _unprocessable(self, response: Any, size: int) -> SendResult:
        """Split Lago's per-index 422 into already-stored and invalid events. An error Lago does not pin to an
        index (``too_many_events``, an unexpected body) rejects the batch as a whole."""
        result = SendResult(Outcome.REJECTED, 422, f"422 {self.excerpt(response)}")
        try:
            details = response.json().get("error_details")
        except (ValueError, AttributeError):
            return result
        if not isinstance(details, dict) or not details:
            return result
        for key, errors in details.items():
            if not (isinstance(key, str) and key.isdigit() and int(key) < size and isinstance(errors, dict | str)):
                result.duplicates.clear()
                result.invalid.clear()
                return result  # not pinned to an index: the batch as a whole was refused
            index = int(key)
            if isinstance(errors, str):  # e.g. "expression_evaluation_failed: ..." (lago-api CreateBatchService)
                result.invalid[index] = "422 " + errors
            elif errors.keys() == {"transaction_id"} and errors["transaction_id"] == ["value_already_exist"]:
                result.duplicates.add(index)
            else:
                result.invalid[index] = "422 " + json.dumps(errors, sort_keys=True, ensure_ascii=False)
        return result


def lago_instant(value: Any) -> datetime | None:
    """A Lago timestamp (Unix seconds as a number or text, or the ISO 8601 Lago answers with) as an aware datetime,
    to the millisecond; ``None`` when unreadable."""
    if value is None or isinstance(value, bool):
        return None
    try:
        moment = datetime.fromtimestamp(float(Decimal(str(value))), tz=UTC)
    except (ArithmeticError, ValueError, OverflowError):
        try:
            moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
        moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def iso_milliseconds(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_differences(held: dict[str, Any], sent: dict[str, Any]) -> list[str]:
    """The fields in which the event Lago holds differs from the one sent (subscription, code, timestamp to the
    millisecond, properties with numbers compared by value)."""
    differences = [
        name for name in ("external_subscription_id", "code") if str(held.get(name) or "") != str(sent.get(name) or "")
    ]
    theirs, ours = lago_instant(held.get("timestamp")), lago_instant(sent.get("timestamp"))
    if theirs is not None and ours is not None and theirs != ours:
        differences.append("timestamp")
    if not same_properties(held.get("properties") or {}, sent.get("properties") or {}):
        differences.append("properties")
    return differences


def same_properties(held: dict[str, Any], sent: dict[str, Any]) -> bool:
    """Equal property maps, numbers compared by value (Lago may give ``120`` back for ``"120"`` or ``120.0``)."""
    if not isinstance(held, dict) or held.keys() != sent.keys():
        return False
    return all(_same_value(held[key], sent[key]) for key in sent)


def _same_value(left: Any, right: Any) -> bool:
    if left == right:
        return True
    try:
        return Decimal(str(left)) == Decimal(str(right))
    except ArithmeticError:
        return False
