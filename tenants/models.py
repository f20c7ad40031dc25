"""The tenant tree.

Each tenant stores a materialized ``path`` of its ancestors' primary keys (``/1/7/42/``), so its lineage is one
indexed query and its subtree one prefix query. ``tenants.tree`` is the only code that changes the shape of the tree.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models, transaction

TENANT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
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
