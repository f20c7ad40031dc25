"""``TenantContext``: who is acting, and the lineage (root -> self) every quota and rollup walks."""

from __future__ import annotations

from dataclasses import dataclass, replace


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
    visible_from: int = 0
    """Index in ``lineage`` of the highest level the *caller* may learn about: the tenant of the credential the
    request came with (``tenants.resolvers``). Levels above it are "upstream": HTTP answers say only that an upstream
    quota refused, and when it resets, never their ids, limits or usage. ``0`` (everything) for Python callers."""

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
    def visible_levels(self) -> tuple[TenantRef, ...]:
        """The levels the caller may see in full: its credential's tenant and below (see ``visible_from``)."""
        return self.lineage[self.visible_from :]

    def is_visible(self, level_pk: int) -> bool:
        """Whether the level ``level_pk`` of this lineage is the caller's own or below it."""
        return any(level.pk == level_pk for level in self.visible_levels)

    def seen_from(self, level_pk: int) -> TenantContext:
        """This context for a caller whose credential belongs to the level ``level_pk`` of this lineage."""
        index = next(i for i, level in enumerate(self.lineage) if level.pk == level_pk)
        return replace(self, visible_from=index)

    @property
    def lineage_ids(self) -> tuple[str, ...]:
        return tuple(level.tenant_id for level in self.lineage)
