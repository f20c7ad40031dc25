"""``get_meter()``: the adapter named by ``METERING["ADAPTER"]``."""

from __future__ import annotations

from functools import lru_cache

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from .conf import metering_settings
from .protocol import MeteringProtocol


def get_meter() -> MeteringProtocol:
    """A ready adapter instance. The setting is read on every call, so ``override_settings`` takes effect."""
    return _build(str(metering_settings.ADAPTER))


@lru_cache(maxsize=8)
def _build(path: str) -> MeteringProtocol:
    try:
        adapter_class = import_string(path)
    except ImportError as error:
        raise ImproperlyConfigured(f"METERING['ADAPTER'] = {path!r} cannot be imported: {error}") from error
    try:
        adapter = adapter_class()
    except TypeError as error:
        raise ImproperlyConfigured(
            f"METERING['ADAPTER'] = {path!r} cannot be built without arguments: {error}"
        ) from error
    if not isinstance(adapter, MeteringProtocol):
        raise ImproperlyConfigured(f"METERING['ADAPTER'] = {path!r} does not implement MeteringProtocol")
    return adapter
