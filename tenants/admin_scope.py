"""Tenant-scoped administrators: the one place that decides what an admin user may see and change.

A staff user bound to a tenant by a ``TenantAdminScope`` sees, in every admin built on ``TenantScopedAdminMixin``,
only the rows of that tenant's subtree (the tenant and its descendants); anything else answers as if it did not
exist. Within the subtree Django's model permissions still apply. Limits are never raised from below: quotas (and the
``exempt`` flag, which lifts every limit above) may be set only *strictly* below the scope's tenant, so the scope's
own tenant and its quotas are view-only to its administrators — lowering is refused too, which keeps the rule
simple and leaves changing a tenant's own limits to whoever administers its parent.

Superusers, and staff users without a scope, are not narrowed (the latter remain bound by their model permissions).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db.models import ForeignKey, Model, Q, QuerySet
from django.forms import ModelChoiceField
from django.http import HttpRequest

from .models import Tenant, TenantAdminScope

_UNSET: Any = object()
_REQUEST_ATTR = "_xaas_admin_scope"

if TYPE_CHECKING:
    _Base = admin.ModelAdmin
else:
    _Base = object


def admin_scope(request: HttpRequest) -> Tenant | None:
    """The tenant whose subtree bounds this request's admin user; ``None``: not narrowed. Read once per request."""
    cached = getattr(request, _REQUEST_ATTR, _UNSET)
    if cached is not _UNSET:
        return cached
    user = getattr(request, "user", None)
    scope = None
    if user is not None and user.is_authenticated and not user.is_superuser:
        binding = TenantAdminScope.objects.select_related("tenant").filter(user_id=user.pk).first()
        scope = binding.tenant if binding is not None else None
    setattr(request, _REQUEST_ATTR, scope)
    return scope


def in_subtree(scope: Tenant | None, tenant_path: str) -> bool:
    """Is the tenant with ``tenant_path`` the scope's tenant or one of its descendants (always, without a scope)?"""
    return scope is None or scope.contains(tenant_path)


def strictly_below(scope: Tenant | None, tenant_path: str) -> bool:
    """Is the tenant a strict descendant of the scope's tenant (always, without a scope)?"""
    return scope is None or scope.is_strictly_above(tenant_path)


def may_set_limits(scope: Tenant | None, tenant: Tenant) -> bool:
    """May an administrator with ``scope`` set quotas (or exemptions) on ``tenant``? Only strictly below the scope."""
    return strictly_below(scope, tenant.path)


def refusal(scope: Tenant) -> str:
    return (
        f"You administer “{scope.external_id}”: limits can be set only on its descendants, "
        f"never on {scope.external_id} itself or on its ancestors."
    )


def check_may_set_limits(scope: Tenant | None, tenant: Tenant | None, field: str = "tenant") -> None:
    """Raise a form ``ValidationError`` on ``field`` when ``scope`` may not set limits on ``tenant``."""
    if scope is not None and tenant is not None and not may_set_limits(scope, tenant):
        raise ValidationError({field: refusal(scope)}, code="scope")


def visible_tenants(request: HttpRequest) -> QuerySet[Tenant]:
    scope = admin_scope(request)
    tenants = Tenant.objects.all()
    return tenants if scope is None else tenants.filter(path__startswith=scope.path)


class TenantScopedAdminMixin(_Base):
    """Narrows a ``ModelAdmin`` to the request's scope. Put it first among the bases.

    ``tenant_lookup`` is the ORM path from the model to its ``Tenant`` (``""`` for ``Tenant`` itself).
    ``edit_strictly_below``: objects of the scope's own tenant are view-only (quotas, the tenant itself).
    """

    tenant_lookup: str = "tenant"
    edit_strictly_below: bool = False

    def scope_filter(self, scope: Tenant) -> Q:
        prefix = f"{self.tenant_lookup}__" if self.tenant_lookup else ""
        return Q(**{f"{prefix}path__startswith": scope.path})

    def tenant_of(self, obj: Model) -> Tenant:
        target: Any = obj
        for part in filter(None, self.tenant_lookup.split("__")):
            target = getattr(target, part)
        return target

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        queryset = super().get_queryset(request)
        scope = admin_scope(request)
        return queryset if scope is None else queryset.filter(self.scope_filter(scope))

    def object_visible(self, request: HttpRequest, obj: Model) -> bool:
        return in_subtree(admin_scope(request), self.tenant_of(obj).path)

    def object_editable(self, request: HttpRequest, obj: Model) -> bool:
        scope = admin_scope(request)
        path = self.tenant_of(obj).path
        return strictly_below(scope, path) if self.edit_strictly_below else in_subtree(scope, path)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        allowed = super().has_view_permission(request, obj)
        return bool(allowed) and (obj is None or self.object_visible(request, obj))

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        allowed = super().has_change_permission(request, obj)
        return bool(allowed) and (obj is None or self.object_editable(request, obj))

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        allowed = super().has_delete_permission(request, obj)
        return bool(allowed) and (obj is None or self.object_editable(request, obj))

    def formfield_for_foreignkey(
        self, db_field: ForeignKey[Any, Any], request: HttpRequest, **kwargs: Any
    ) -> ModelChoiceField[Any] | None:
        scope = admin_scope(request)
        if scope is not None and db_field.related_model is Tenant:
            kwargs["queryset"] = visible_tenants(request)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)


class UnscopedOnlyAdminMixin(_Base):
    """For rows that belong to no tenant (delivery sinks, the scopes themselves): hidden from scoped administrators."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return admin_scope(request) is None and super().has_module_permission(request)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return admin_scope(request) is None and bool(super().has_view_permission(request, obj))

    def has_add_permission(self, request: HttpRequest, *args: Any, **kwargs: Any) -> bool:
        return admin_scope(request) is None and bool(super().has_add_permission(request, *args, **kwargs))

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return admin_scope(request) is None and bool(super().has_change_permission(request, obj))

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return admin_scope(request) is None and bool(super().has_delete_permission(request, obj))


# ---- exemption is never acquired from below ----
# An exempt level lifts every limit of its whole subtree, so from inside a scope it would be a way around the limits
# the scope's own ancestors set (put a tenant under an exempt one, add tenants there, or issue a key for one). Only an
# unscoped administrator (a superuser, or staff without a scope) may change what is exempt or what sits under an
# exempt level; the refusals never name a level above the scope.

EXEMPTION_REFUSAL = {
    "exempt": "Only an administrator without a tenant scope can make a tenant exempt or end its exemption.",
    "move": "Only an administrator without a tenant scope can move a tenant into or out of an exempt (zero-cap) "
    "subtree, or move a subtree that holds an exempt tenant.",
    "add": "Only an administrator without a tenant scope can add a tenant inside an exempt (zero-cap) subtree.",
    "key": "Only an administrator without a tenant scope can issue API keys for a tenant inside an exempt "
    "(zero-cap) subtree.",
}


def _path_pks(tenant_path: str) -> list[int]:
    return [int(part) for part in tenant_path.strip("/").split("/") if part]


def lineage_is_exempt(tenant_path: str) -> bool:
    """Is any level from the root down to the tenant with ``tenant_path`` (itself included) exempt? One query."""
    pks = _path_pks(tenant_path)
    return bool(pks) and Tenant.objects.filter(pk__in=pks, exempt=True).exists()


def subtree_is_exempt_anywhere(tenant_path: str) -> bool:
    """Does the subtree of the tenant with ``tenant_path`` hold an exempt tenant (itself included)? One query."""
    return bool(tenant_path) and Tenant.objects.filter(path__startswith=tenant_path, exempt=True).exists()


def tenant_exemption_refusal(
    scope: Tenant | None, tenant_pk: int | None, *, exempt: bool, parent: Tenant | None
) -> tuple[str, str] | None:
    """``(field, message)`` when ``scope`` may not save the tenant ``tenant_pk`` (``None``: a new one) with these
    ``exempt`` and ``parent`` values; ``None`` when it may. Reads the stored row, not the form's instance."""
    if scope is None:
        return None
    parent_path = Tenant.objects.filter(pk=parent.pk).values_list("path", flat=True).first() if parent else None
    if tenant_pk is None:
        if exempt:
            return "exempt", EXEMPTION_REFUSAL["exempt"]
        if parent_path and lineage_is_exempt(parent_path):
            return "parent", EXEMPTION_REFUSAL["add"]
        return None
    stored = Tenant.objects.filter(pk=tenant_pk).values("exempt", "parent_id", "path").first()
    if stored is None:
        return None  # deleted meanwhile: the save fails on its own
    if bool(exempt) != stored["exempt"]:
        return "exempt", EXEMPTION_REFUSAL["exempt"]
    new_parent_pk = parent.pk if parent is not None else None
    if new_parent_pk != stored["parent_id"] and (
        lineage_is_exempt(stored["path"])
        or subtree_is_exempt_anywhere(stored["path"])
        or (parent_path is not None and lineage_is_exempt(parent_path))
    ):
        return "parent", EXEMPTION_REFUSAL["move"]
    return None


def key_exemption_refusal(scope: Tenant | None, tenant: Tenant | None) -> tuple[str, str] | None:
    """``("tenant", message)`` when ``scope`` may not issue a key for ``tenant`` (inside an exempt subtree)."""
    if scope is None or tenant is None:
        return None
    path = Tenant.objects.filter(pk=tenant.pk).values_list("path", flat=True).first()
    if path and lineage_is_exempt(path):
        return "tenant", EXEMPTION_REFUSAL["key"]
    return None
