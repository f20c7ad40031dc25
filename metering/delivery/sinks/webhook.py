"""A generic webhook: signed JSON batches POSTed to ``SINK_URL`` (a ClickHouse ingestion service, any collector).

Request::

    POST {SINK_URL}
    Content-Type: application/json
    X-Metering-Signature: sha256=<hex HMAC-SHA256 of the raw body with WEBHOOK_SECRET>

    {"events": [{"idempotency_key": "org-1/tx-42", "tenant_id": "org-1", "transaction_id": "tx-42",
                 "feature": "llm_tokens", "quantity": "120.5", "units": 120500000,
                 "timestamp": "2026-05-01T12:00:00.123456Z", "metadata": {...}}, ...]}

The receiver's contract: verify the signature over the raw bytes, store each event at most once per
``idempotency_key`` (a batch can arrive again when an answer was lost), answer 2xx once stored. 401/403/404 stop
delivery until the configuration changes; 408/429/5xx and network errors are retried (``Retry-After`` honoured);
another 4xx may name the events it refuses as ``{"errors": {"<index>": ...}}`` (those are dead-lettered, the rest
resent), else the batch is split until the refused events are isolated.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from ...events import units_to_quantity
from ..outbox import ClaimedFact
from .base import Outcome, SendResult, Sink, encode

SIGNATURE_HEADER = "X-Metering-Signature"


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSink(Sink):
    name = "webhook"
    secret_setting = "WEBHOOK_SECRET"  # noqa: S105 (a setting's name)

    def build(self, fact: ClaimedFact) -> dict[str, Any]:
        return {
            "idempotency_key": f"{fact.tenant_id}/{fact.transaction_id}",
            "tenant_id": fact.tenant_id,
            "transaction_id": fact.transaction_id,
            "feature": fact.feature,
            "quantity": str(units_to_quantity(fact.units)),
            "units": fact.units,
            "timestamp": fact.timestamp.isoformat().replace("+00:00", "Z"),
            "metadata": fact.metadata,
        }

    def send(self, events: list[dict[str, Any]]) -> SendResult:
        body = encode({"events": events})
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature(self.secret, body)}
        url, auth = self.endpoint()  # credentials in SINK_URL become Basic auth (never part of a logged URL)
        response = self.post(url, body, headers, auth)
        if isinstance(response, SendResult):
            return response
        if 200 <= response.status_code < 300:
            return SendResult(Outcome.OK, response.status_code)
        common = self.classify_status(response)
        if common is not None:
            return common
        result = SendResult(Outcome.REJECTED, response.status_code, f"{response.status_code} {self.excerpt(response)}")
        try:
            errors = response.json().get("errors")
        except (ValueError, AttributeError):
            return result
        if (
            isinstance(errors, dict)
            and errors
            and all(isinstance(key, str) and key.isdigit() and int(key) < len(events) for key in errors)
        ):
            result.invalid = {
                int(key): f"{response.status_code} " + json.dumps(value, sort_keys=True, ensure_ascii=False)
                for key, value in errors.items()
            }
        return result
