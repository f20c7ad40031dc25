"""Named errors of the tenant tree. Each is a ``ValueError`` carrying a stable ``code`` and the ``field``."""

from __future__ import annotations


class TenantError(ValueError):
    code = "tenant_error"
    field = "tenant_id"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        if field is not None:
            self.field = field


class UnknownTenant(TenantError):
    """No tenant has this id."""

    code = "unknown_tenant"


class InactiveTenant(TenantError):
    """The tenant, or one of its ancestors, is deactivated."""

    code = "inactive_tenant"


class InvalidTenantId(TenantError):
    code = "invalid_tenant_id"


class TreeError(TenantError):
    """A change would break the tree: a cycle, self-parenting, or too deep a tree."""

    code = "invalid_tree"
    field = "parent"


class InvalidApiKey(TenantError):
    """The ``Authorization: Bearer`` key is malformed, unknown, revoked or expired (answered 401)."""

    code = "invalid_api_key"
    field = "Authorization"
