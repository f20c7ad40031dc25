"""``lago_sync``: from tenants to billed subscriptions. For each billing tenant, a Lago customer (external id = the
tenant id) and its subscription on a plan; for each metered feature, a billable metric (``sum_agg`` over the
quantity property, code from ``LAGO_METRICS``). Idempotent: each object is read first (``GET``) and only created
or updated when it is missing or differs; a subscription on another plan is reported and left alone (changing a
customer's plan is a billing decision). The subscription id is written back to ``Tenant.lago_subscription_id``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from tenants.models import Tenant

from ..conf import metering_settings
from ..models import UsageRollup
from .sinks.base import SendResult, encode, http_client
from .sinks.lago import LagoSink, metric_for


class LagoSyncError(Exception):
    """Lago refused or did not answer a sync request (the message says which and why)."""


@dataclass
class SyncReport:
    changes: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def metered_features() -> list[str]:
    """The features to bill: those named in ``LAGO_METRICS`` and those with recorded usage."""
    using = str(metering_settings.DATABASE_ALIAS)
    recorded = UsageRollup.objects.using(using).order_by().values_list("feature", flat=True).distinct()
    return sorted(set(metering_settings.LAGO_METRICS or {}) | set(recorded))


class _Lago:
    def __init__(self, sink: LagoSink) -> None:
        self.sink = sink

    def _call(self, method: str, path: str, payload: Any = None) -> httpx.Response:
        url, _ = self.sink.endpoint(path)
        headers = {"Authorization": f"Bearer {self.sink.secret}", "Accept": "application/json"}
        if method == "GET":
            response = self.sink.get(url, headers)
        else:
            headers["Content-Type"] = "application/json"
            try:  # the sink's pooled client (no proxies from the environment, the sink's timeout)
                response = http_client().request(method, url, content=encode(payload), headers=headers)
            except httpx.HTTPError as error:
                raise LagoSyncError(f"{method} {path}: {type(error).__name__}") from None
        if isinstance(response, SendResult):
            raise LagoSyncError(f"{method} {path}: {response.error}")
        if response.status_code not in (200, 404) or (response.status_code == 404 and method != "GET"):
            raise LagoSyncError(f"{method} {path}: {response.status_code} {self.sink.excerpt(response)}")
        return response

    def read(self, path: str, root: str) -> dict[str, Any] | None:
        response = self._call("GET", path)
        return None if response.status_code == 404 else self._object(response, f"GET {path}", root)

    def write(self, method: str, path: str, root: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._object(self._call(method, path, {root: body}), f"{method} {path}", root)

    def _object(self, response: httpx.Response, what: str, root: str) -> dict[str, Any]:
        """The answer's ``root`` object, or ``LagoSyncError`` (a proxy's HTML page, a body without it): never a 500."""
        try:
            found = response.json()[root]
            if not isinstance(found, dict):
                raise TypeError(root)
            return dict(found)
        except (ValueError, KeyError, TypeError):
            raise LagoSyncError(f"{what}: {response.status_code} without a {root!r} object") from None


def sync(
    tenants: list[Tenant], plan_code: str, features: list[str] | None = None, *, dry_run: bool = False
) -> SyncReport:
    """Create or update what Lago needs to bill ``tenants`` on ``plan_code`` and ``features`` (default: all)."""
    lago = _Lago(LagoSink())
    report = SyncReport()
    prefix = "would " if dry_run else ""
    for feature in metered_features() if features is None else features:
        code, quantity_property, _ = metric_for(feature)
        wanted = {"name": feature, "code": code, "aggregation_type": "sum_agg", "field_name": quantity_property}
        path = "/api/v1/billable_metrics/" + quote(code, safe="")
        held = lago.read(path, "billable_metric")
        what = f"billable metric {code} (sum_agg over {quantity_property})"
        if held is None:
            if not dry_run:
                lago.write("POST", "/api/v1/billable_metrics", "billable_metric", wanted)
            report.changes.append(f"{prefix}create {what}")
        elif any(held.get(key) != wanted[key] for key in ("aggregation_type", "field_name")):
            if not dry_run:
                lago.write("PUT", path, "billable_metric", wanted)
            report.changes.append(
                f"{prefix}update {what} (was {held.get('aggregation_type')} over {held.get('field_name')})"
            )
        else:
            report.unchanged.append(what)
    for tenant in tenants:
        name = tenant.name or tenant.external_id
        held = lago.read("/api/v1/customers/" + quote(tenant.external_id, safe=""), "customer")
        what = f"customer {tenant.external_id}"
        if held is None or held.get("name") != name:
            if not dry_run:  # Lago's POST /customers creates or updates by external_id
                lago.write("POST", "/api/v1/customers", "customer", {"external_id": tenant.external_id, "name": name})
            report.changes.append(f"{prefix}{'create' if held is None else 'update'} {what}")
        else:
            report.unchanged.append(what)
        subscription_id = tenant.lago_subscription_id or tenant.external_id
        held = lago.read("/api/v1/subscriptions/" + quote(subscription_id, safe=""), "subscription")
        what = f"subscription {subscription_id} of {tenant.external_id} on plan {plan_code}"
        if held is None:
            if not dry_run:
                lago.write(
                    "POST",
                    "/api/v1/subscriptions",
                    "subscription",
                    {
                        "external_customer_id": tenant.external_id,
                        "plan_code": plan_code,
                        "external_id": subscription_id,
                    },
                )
            report.changes.append(f"{prefix}create {what}")
        elif held.get("plan_code") != plan_code:
            report.warnings.append(
                f"{what}: Lago has it on plan {held.get('plan_code')}; left alone (change plans in Lago)"
            )
        else:
            report.unchanged.append(what)
        if tenant.lago_subscription_id != subscription_id:
            if not dry_run:
                Tenant.objects.filter(pk=tenant.pk).update(lago_subscription_id=subscription_id)
            report.changes.append(f"{prefix}set lago_subscription_id of {tenant.external_id} to {subscription_id}")
    return report
