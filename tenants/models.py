"""The tenant tree.

Each tenant stores a materialized ``path`` of its ancestors' primary keys (``/1/7/42/``), so its lineage is one
indexed query and its subtree one prefix query. ``tenants.tree`` is the only code that changes the shape of the tree.
"""

from __future__ import annotations

import re
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models, transaction

# The pattern is part of migration 0001 (a field validator), so it stays as written; its "$" would accept a trailing
# newline, which Tenant.clean refuses with TENANT_ID_RE (whole-string match), the grammar lineage addressing uses.
TENANT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
TENANT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
tenant_id_validator = RegexValidator(
    TENANT_ID_PATTERN,
    "A tenant id is 1-128 characters: letters, digits and . _ : @ -, starting with a letter or digit.",
    code="invalid_tenant_id",
)


class Tenant(models.Model):
    external_id = models.CharField(
        "tenant id",
        max_length=128,
        unique=True,
        validators=[tenant_id_validator],
        help_text="The stable id used outside the database (headers, API, Lago), e.g. org-1.",
    )
    name = models.CharField(max_length=200, blank=True)
    kind = models.CharField(
        max_length=50, blank=True, help_text="Free text: organization, project, key ...", db_index=True
    )
    parent = models.ForeignKey("self", null=True, blank=True, related_name="children", on_delete=models.PROTECT)
    # Ancestors' primary keys, root first, self last: "/1/7/42/". Maintained by tenants.tree, never by hand.
    path = models.CharField(max_length=512, editable=False, default="")
    depth = models.PositiveSmallIntegerField(editable=False, default=0)
    is_active = models.BooleanField("active", default=True)
    exempt = models.BooleanField(
        "exempt (zero-cap)",
        default=False,
        help_text="Usage of this tenant and its subtree is recorded but never blocked.",
    )
    metadata = models.JSONField(default=dict, blank=True)
    lago_subscription_id = models.CharField(
        "Lago subscription id",
        max_length=255,
        blank=True,
        help_text="Lago external_subscription_id billed for this tenant's usage; empty: inherited from the "
        "nearest ancestor that has one.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        # Groups each subtree together; sibling order depends on the database collation.
        ordering = ["path"]
        indexes = [
            # LIKE 'prefix%' on PostgreSQL needs the pattern operator class to use an index.
            models.Index(fields=["path"], name="xaas_tenant_path_prefix", opclasses=["varchar_pattern_ops"]),
        ]

    def __str__(self) -> str:
        return self.external_id

    def save(self, *args: Any, **kwargs: Any) -> None:
        from . import tree

        with transaction.atomic(using=kwargs.get("using")):
            if self._state.adding:
                if self.parent_id is not None:
                    self.parent = type(self).objects.get(pk=self.parent_id)
                    tree.check_parent(self, self.parent)
                super().save(*args, **kwargs)
                tree.place_new(self)
            else:
                # The stored path is the truth (a concurrent move may have changed it since this instance was
                # loaded), so path and depth are never written from memory.
                stored = type(self).objects.select_for_update().values("path", "parent_id").get(pk=self.pk)
                self.path = stored["path"]
                if kwargs.get("update_fields") is None:
                    kwargs["update_fields"] = [
                        field.attname
                        for field in self._meta.concrete_fields
                        if not field.primary_key and field.attname not in ("path", "depth", "created_at")
                    ]
                if self.parent_id != stored["parent_id"]:
                    if self.parent_id is not None:
                        self.parent = type(self).objects.get(pk=self.parent_id)
                    super().save(*args, **kwargs)
                    tree.relocate(self, stored["path"])
                else:
                    super().save(*args, **kwargs)

    def clean(self) -> None:
        from .exceptions import TreeError
        from .tree import check_parent

        if (
            isinstance(self.external_id, str)
            and self.external_id.endswith("\n")
            and re.search(TENANT_ID_PATTERN, self.external_id)
        ):  # passed the field validator only thanks to its "$"
            raise ValidationError({"external_id": tenant_id_validator.message})
        if self.pk is not None:
            stored = type(self).objects.filter(pk=self.pk).values_list("external_id", flat=True).first()
            if stored is not None and stored != self.external_id:
                raise ValidationError({"external_id": "A tenant id is stable: it cannot be changed."})
        try:
            check_parent(self, self.parent)
        except TreeError as error:
            raise ValidationError({"parent": str(error)}) from error

    @property
    def ancestor_pks(self) -> list[int]:
        """Primary keys from the root down to this tenant (inclusive)."""
        return [int(part) for part in self.path.strip("/").split("/") if part]

    @property
    def root_pk(self) -> int:
        return self.ancestor_pks[0]

    def contains(self, tenant_path: str) -> bool:
        """Is the tenant with ``tenant_path`` this tenant or one of its descendants? The one subtree rule that API
        keys, scoped administrators and quotas all follow."""
        return bool(self.path) and bool(tenant_path) and tenant_path.startswith(self.path)

    def is_strictly_above(self, tenant_path: str) -> bool:
        """Is the tenant with ``tenant_path`` a strict descendant (where limits may be set from here)?"""
        return self.contains(tenant_path) and tenant_path != self.path


class ApiKey(models.Model):
    """A secret that acts for one tenant's subtree over the REST API (``Authorization: Bearer xk_<prefix>_<secret>``).

    Only a hash of the key is stored; the plaintext is shown once, when the key is created (``tenants.apikeys``).
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True, help_text="What the key is for, e.g. 'billing worker'.")
    prefix = models.CharField(
        max_length=16, unique=True, editable=False, help_text="The public start of the key, to recognise it."
    )
    secret_hash = models.CharField("SHA-256 of the key", max_length=64, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Empty: never expires.")
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        verbose_name = "API key"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"xk_{self.prefix}_… ({self.tenant_id})"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def is_expired(self, now: Any = None) -> bool:
        from django.utils import timezone

        return self.expires_at is not None and self.expires_at <= (now or timezone.now())

    @property
    def is_usable(self) -> bool:
        return not self.is_revoked and not self.is_expired()


class TenantAdminScope(models.Model):
    """Binds a staff user to one tenant: in the admin that user sees and edits only this tenant's subtree.

    Quotas may be set only strictly below the tenant (never on it or its ancestors); see ``tenants.admin_scope``.
    A staff user without a scope is limited by Django's model permissions alone; superusers see everything.
    """

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="tenant_admin_scope")
    # PROTECT: deleting the tenant must not silently turn its administrators into unscoped staff.
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="admin_scopes")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "tenant administrator"

    def __str__(self) -> str:
        return f"{self.user} administers {self.tenant}"
