"""A separate OS process of one site (``project.settings``, its database from the environment), driven by a test.

``python -m tests.site_worker serve`` reads one JSON command per line on stdin and answers one JSON line on stdout,
keeping its process (and its caches) alive between commands, like a server does:

- ``["seed", limit]``: tree org -> p1 -> k1, k2 and p2; a hard ``total`` limit of ``calls`` on org; epochs reset to 0;
- ``["consume", tenant_id, feature, quantity]`` / ``["check", tenant_id, feature, quantity]``: a decision;
- ``["hammer", tenant_ids, feature, attempts]``: ``attempts`` consumes of 1, round robin: admitted and refused counts;
- ``["audit", root_id, tenant_id, feature]``: facts, rollups and the live Redis counter of ``tenant_id``, the drift
  ``compare_live`` finds, this site's namespace and its keys in Redis;
- ``["quota-set", tenant_id, feature, limit]`` (the ``quota set`` command), ``["deactivate"|"activate", tenant_id]``,
  ``["exempt", tenant_id, 0|1]``, ``["move", tenant_id, parent_id]``: changes, as another process would make them.
"""

from __future__ import annotations

import io
import json
import os
import sys
from decimal import Decimal
from typing import Any


def _setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()


def _seed(limit: int) -> dict[str, Any]:
    from metering.models import CounterEpoch
    from quotas.models import QuotaLimit
    from tenants.tree import create_tenant

    create_tenant("org")
    create_tenant("p1", parent="org")
    create_tenant("p2", parent="org")
    create_tenant("k1", parent="p1")
    create_tenant("k2", parent="p1")
    from tenants.models import Tenant

    QuotaLimit.objects.create(
        tenant=Tenant.objects.get(external_id="org"), feature="calls", limit=Decimal(limit), period="total"
    )
    # Fresh trees have epoch 0 (no row) on every site: the case where only the namespace tells two sites apart.
    CounterEpoch.objects.all().delete()
    return {"pks": dict(Tenant.objects.values_list("external_id", "pk"))}


def _decide(kind: str, tenant_id: str, feature: str, quantity: str) -> dict[str, Any]:
    from quotas.exceptions import QuotaExceeded
    from quotas.handler import QuotaPolicyHandler
    from tenants.exceptions import InactiveTenant

    try:
        handler = QuotaPolicyHandler(tenant_id)
        if kind == "consume":
            decision = handler.consume(feature, quantity)
        else:
            decision = handler.check(feature, quantity, raise_exception=True)
    except QuotaExceeded as error:
        return {"allowed": False, "error": "quota_exceeded", "tenant_id": error.tenant_id, "limit": str(error.limit)}
    except InactiveTenant:
        return {"allowed": False, "error": "inactive"}
    return {
        "allowed": decision.allowed,
        "lineage": list(handler.context.lineage_ids),
        "exempt": handler.context.exempt,
        "hard": [status.hard for status in decision.statuses],
        "limits": [str(status.limit) for status in decision.statuses],
    }


def _hammer(tenant_ids: list[str], feature: str, attempts: int) -> dict[str, Any]:
    from quotas.exceptions import QuotaExceeded
    from quotas.handler import QuotaPolicyHandler

    admitted = refused = 0
    for index in range(attempts):
        try:
            QuotaPolicyHandler(tenant_ids[index % len(tenant_ids)]).consume(feature, 1)
            admitted += 1
        except QuotaExceeded:
            refused += 1
    return {"admitted": admitted, "refused": refused}


def _audit(root_id: str, tenant_id: str, feature: str) -> dict[str, Any]:
    from django.db.models import Sum

    from metering import counters, rollups
    from metering.conf import metering_settings
    from metering.models import UsageRecord
    from tenants import namespace
    from tenants.models import Tenant

    using = metering_settings.DATABASE_ALIAS
    from metering import log

    if log.is_log_mode():  # the facts are in the database once drained
        from metering import drain

        while drain.drain(delay=0).entries:
            pass
    root = Tenant.objects.get(external_id=root_id)
    tenant = Tenant.objects.get(external_id=tenant_id)
    facts = UsageRecord.objects.filter(tenant__path__startswith=tenant.path, feature=feature).aggregate(
        units=Sum("units")
    )["units"]
    redis = counters.client()
    site = namespace.current()
    keys = sorted(key.decode() for key in redis.scan_iter(match=f"{site.counter_prefix}{{{site.hash}.*", count=1000))
    return {
        "facts": int(facts or 0),
        "rollups": rollups.sum_units(tenant.pk, feature, None, None, using=using),
        "counter": counters.read(root.pk, tenant.pk, feature, "total", None, None),
        "drift": [item.key for item in counters.compare_live(root.pk, repair=False, using=using)],
        "namespace": [site.label, site.hash],
        "keys": keys,
    }


def _change(command: str, args: list[Any]) -> dict[str, Any]:
    from django.core.management import call_command

    from tenants.models import Tenant
    from tenants.tree import move_tenant

    if command == "quota-set":
        call_command("quota", "set", args[0], args[1], str(args[2]), "--period", "total", stdout=io.StringIO())
    elif command == "move":
        move_tenant(args[0], args[1])
    else:
        tenant = Tenant.objects.get(external_id=args[0])
        if command == "exempt":
            tenant.exempt = bool(args[1])
        else:
            tenant.is_active = command == "activate"
        tenant.save()
    return {"done": command}


def handle(command: list[Any]) -> dict[str, Any]:
    name, args = command[0], command[1:]
    if name == "seed":
        return _seed(int(args[0]))
    if name in ("consume", "check"):
        return _decide(name, args[0], args[1], str(args[2]))
    if name == "hammer":
        return _hammer(list(args[0]), args[1], int(args[2]))
    if name == "audit":
        return _audit(args[0], args[1], args[2])
    return _change(name, args)


def serve() -> None:
    _setup()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = handle(json.loads(line))
        except Exception as error:  # reported to the test, which fails on it
            answer = {"exception": f"{type(error).__name__}: {error}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    serve()
