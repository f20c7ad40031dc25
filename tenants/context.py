"""``TenantContext``: who is acting, and the lineage (root -> self) every quota and rollup walks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TenantRef:
    """One level of a lineage, as cached: enough to decide and to record without touching the tenant table."""

    pk: int
    tenant_id: str
    kind: str
    exempt: bool
    is_active: bool


@dataclass(frozen=True, slots=True)
class TenantContext:
    tenant_id: str
    lineage: tuple[TenantRef, ...]
    """Root first, this tenant last."""

    @property
    def tenant(self) -> TenantRef:
        return self.lineage[-1]

    @property
    def root(self) -> TenantRef:
        return self.lineage[0]

    @property
    def exempt(self) -> bool:
        """Zero-cap: this tenant or any ancestor is exempt, so the whole subtree is recorded but never blocked."""
        return any(level.exempt for level in self.lineage)

    @property
    def is_active(self) -> bool:
        return all(level.is_active for level in self.lineage)

    @property
    def path(self) -> str:
        """The materialized path this context was read with; writers compare it to detect a concurrent move."""
        return "/" + "".join(f"{level.pk}/" for level in self.lineage)

    @property
    def lineage_ids(self) -> tuple[str, ...]:
        return tuple(level.tenant_id for level in self.lineage)
