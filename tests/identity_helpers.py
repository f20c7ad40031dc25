"""Credentials for tests: an API key of a tenant, or the trusted-header configuration for tests of other things."""

from __future__ import annotations

# For tests about quotas, stores and recording rather than identity: X-Tenant-ID trusted as a gateway would set it.
TRUSTED_HEADER = {"TENANT_RESOLVER": "tenants.resolvers.header_resolver", "TRUST_TENANT_HEADER": True}


def key_of(tenant_id: str, **kwargs: object) -> str:
    """A new API key's plaintext for ``tenant_id``."""
    from tenants.apikeys import create_api_key

    return create_api_key(tenant_id, **kwargs)[1]  # type: ignore[arg-type]


def bearer(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def acting_for(tenant_id: str, *, key_tenant: str | None = None) -> dict[str, str]:
    """Headers that act for ``tenant_id``: a key of ``key_tenant`` (default: the tenant itself) narrowed to it."""
    return bearer(key_of(key_tenant or tenant_id), **{"X-Tenant-ID": tenant_id})
