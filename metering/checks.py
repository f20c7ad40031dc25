"""System checks of ``settings.METERING``."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register
from django.utils.module_loading import import_string

from .conf import KNOWN_KEYS, metering_settings


@register()
def check_metering_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    raw = getattr(settings, "METERING", {})
    if not isinstance(raw, dict):
        return [Error("settings.METERING must be a dict.", id="xaas_metering.E000")]
    for unknown in sorted(set(raw) - KNOWN_KEYS):
        messages.append(
            Warning(
                f"METERING[{unknown!r}] is not a known key and is ignored.",
                hint=f"Known keys: {', '.join(sorted(KNOWN_KEYS))}.",
                id="xaas_metering.W001",
            )
        )
    try:
        import_string(str(metering_settings.ADAPTER))
    except ImportError as error:
        messages.append(
            Error(
                f"METERING['ADAPTER'] = {metering_settings.ADAPTER!r} cannot be imported: {error}",
                hint="Use 'metering.adapters.database.DatabaseMeteringAdapter' or the dotted path of your own.",
                id="xaas_metering.E001",
            )
        )
    batch_size = metering_settings.BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 10_000:
        messages.append(
            Error(
                f"METERING['BATCH_SIZE'] must be an integer from 1 to 10000, got {batch_size!r}.",
                id="xaas_metering.E002",
            )
        )
    sink_url = metering_settings.SINK_URL
    if sink_url is not None:
        parsed = urlparse(str(sink_url))
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            messages.append(
                Error(f"METERING['SINK_URL'] must be an http(s) URL, got {sink_url!r}.", id="xaas_metering.E003")
            )
    if metering_settings.DATABASE_ALIAS not in settings.DATABASES:
        messages.append(
            Error(
                f"METERING['DATABASE_ALIAS'] = {metering_settings.DATABASE_ALIAS!r} is not in DATABASES.",
                id="xaas_metering.E004",
            )
        )
    for key in (
        "MAX_METADATA_BYTES",
        "FUTURE_TOLERANCE_SECONDS",
        "COUNTER_TTL_SECONDS",
        "MAX_FEATURE_NAME_LENGTH",
    ):
        value = getattr(metering_settings, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            messages.append(
                Error(f"METERING[{key!r}] must be a positive integer, got {value!r}.", id="xaas_metering.E005")
            )
    return messages
