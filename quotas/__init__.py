"""Hierarchical quotas: every level of a tenant's lineage must have room, decided atomically.

Public API::

    from quotas import QuotaPolicyHandler, QuotaExceeded, enforce_quota
"""

from .exceptions import QuotaExceeded

__all__ = ["QuotaExceeded", "QuotaPolicyHandler", "enforce_quota"]


def __getattr__(name: str) -> object:
    # Lazy: the handler and decorator import models, which must wait until the app registry is ready.
    if name == "QuotaPolicyHandler":
        from .handler import QuotaPolicyHandler

        return QuotaPolicyHandler
    if name == "enforce_quota":
        from .decorators import enforce_quota

        return enforce_quota
    raise AttributeError(name)
