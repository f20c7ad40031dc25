"""The feature registry: what each feature measures and how its facts aggregate (``FeatureDefinition``).

A feature nobody registered is a ``sum`` of non-negative quantities, as before the registry existed. With
``METERING["FEATURE_REGISTRY"] = "closed"`` only registered features can be recorded or reserved (``UnknownFeature``
otherwise), like the ``METERING["FEATURES"]`` allowlist but kept in the database, the admin and ``manage.py feature``.

A definition's aggregation never changes once saved (the facts already recorded were counted under it: changing
``sum`` into ``latest`` would rewrite history). Each process keeps the definitions it read for
``CACHE_SECONDS``: a feature registered meanwhile is refused (closed registry) or summed (open) for at most that
long by other processes; saving or deleting a definition forgets this process's copy at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.db import models

from .conf import metering_settings
from .exceptions import InvalidFeatureDefinition, UnknownFeature

if TYPE_CHECKING:
    from .models import FeatureDefinition

CACHE_SECONDS = 5.0
MAX_UNIT_LENGTH = 32
MAX_PROPERTY_LENGTH = 100
REGISTRY_MODES = ("open", "closed")


class Aggregation(models.TextChoices):
    SUM = "sum", "sum of quantities over the window"
    COUNT = "count", "number of facts in the window"
    MAX = "max", "largest quantity in the window"
    LATEST = "latest", "gauge: the level now (quantities are signed deltas)"
    UNIQUE_COUNT = "unique_count", "distinct values of a metadata property in the window"


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """What a feature is, as the write and read paths need it (a registered definition, or the default sum)."""

    name: str
    aggregation: str = Aggregation.SUM.value
    unit: str = ""
    property_name: str = ""  # unique_count: the metadata key whose distinct values are counted
    rolls_up: bool = True  # latest: a level's gauge is the sum of its children's current levels
    registered: bool = False

    @property
    def is_gauge(self) -> bool:
        return self.aggregation == Aggregation.LATEST


_cache: dict[tuple[str, str], tuple[float, FeatureSpec | None]] = {}


def _database() -> str:
    return str(metering_settings.DATABASE_ALIAS)


def registered(name: str) -> FeatureSpec | None:
    """The registered definition of ``name``, or ``None`` (cached per process for ``CACHE_SECONDS``)."""
    from .models import FeatureDefinition

    entry = (_database(), name)
    now = time.monotonic()
    cached = _cache.get(entry)
    if cached is not None and now - cached[0] < CACHE_SECONDS:
        return cached[1]
    row = FeatureDefinition.objects.using(entry[0]).filter(name=name).first()
    found = row.spec() if row is not None else None
    if len(_cache) >= 10_000:
        _cache.clear()
    _cache[entry] = (now, found)
    return found


def spec(name: str) -> FeatureSpec:
    """How ``name`` aggregates: its registered definition, or the default ``sum`` for an unregistered feature."""
    return registered(name) or FeatureSpec(name=name)


def registry_closed() -> bool:
    return metering_settings.FEATURE_REGISTRY == "closed"


def check_recordable(name: str) -> None:
    """Raise ``UnknownFeature`` when the registry is closed and ``name`` is not registered."""
    if registry_closed() and registered(name) is None:
        raise UnknownFeature(f"feature_name {name!r} is not registered (METERING['FEATURE_REGISTRY'] is 'closed')")


def forget() -> None:
    """Drop this process's cached definitions (after a save or delete, and in tests)."""
    _cache.clear()


def registry_problem(value: object) -> str | None:
    """Why ``value`` cannot be ``METERING['FEATURE_REGISTRY']``, or ``None``."""
    if value not in REGISTRY_MODES:
        return f"must be 'open' or 'closed', got {value!r}"
    return None


def _printable(value: str, field: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidFeatureDefinition(f"{field} must be at most {limit} characters", field=field)
    if any(not char.isprintable() or 0xD800 <= ord(char) <= 0xDFFF for char in value):
        raise InvalidFeatureDefinition(f"{field} must be printable text (no NUL, control or surrogate)", field=field)
    if value != value.strip():
        raise InvalidFeatureDefinition(f"{field} must not start or end with whitespace", field=field)
    return value


def validate_definition(
    name: object, aggregation: object, unit: object = "", property_name: object = "", rolls_up: object = True
) -> tuple[str, str, str, str, bool]:
    """The cleaned fields of a definition. Raises ``InvalidFeatureDefinition`` (or ``InvalidFeatureName``)."""
    from .events import validate_feature_name

    name = validate_feature_name(name)
    if aggregation not in Aggregation.values:
        raise InvalidFeatureDefinition(
            f"aggregation must be one of {', '.join(Aggregation.values)}, got {str(aggregation)[:40]!r}",
            field="aggregation",
        )
    if not isinstance(unit, str):
        raise InvalidFeatureDefinition("unit must be a string", field="unit")
    if not isinstance(property_name, str):
        raise InvalidFeatureDefinition("property must be a string", field="property")
    if not isinstance(rolls_up, bool):
        raise InvalidFeatureDefinition("rolls_up must be true or false", field="rolls_up")
    unit = _printable(unit, "unit", MAX_UNIT_LENGTH)
    property_name = _printable(property_name, "property", MAX_PROPERTY_LENGTH)
    if aggregation == Aggregation.UNIQUE_COUNT and not property_name:
        raise InvalidFeatureDefinition(
            "a unique_count feature needs the metadata property whose values it counts", field="property"
        )
    if aggregation != Aggregation.UNIQUE_COUNT and property_name:
        raise InvalidFeatureDefinition("only a unique_count feature takes a property", field="property")
    if aggregation != Aggregation.LATEST and not rolls_up:
        raise InvalidFeatureDefinition("only a gauge (latest) may be kept out of the roll-up", field="rolls_up")
    return name, str(aggregation), unit, property_name, rolls_up


def define(
    name: str,
    aggregation: str = Aggregation.SUM.value,
    *,
    unit: str = "",
    property_name: str = "",
    rolls_up: bool = True,
    description: str = "",
) -> FeatureDefinition:
    """Register ``name`` (or update its unit and description). Raises ``InvalidFeatureDefinition``, also for a
    change of an existing definition's aggregation, property or roll-up."""
    from .models import FeatureDefinition

    # Judged before any query: a name with NUL must be a named refusal, not PostgreSQL's DataError.
    name, aggregation, unit, property_name, rolls_up = validate_definition(
        name, aggregation, unit, property_name, rolls_up
    )
    if not isinstance(description, str) or "\x00" in description:
        raise InvalidFeatureDefinition("description must be text without NUL", field="description")
    row = FeatureDefinition(
        name=name,
        aggregation=aggregation,
        unit=unit,
        property_name=property_name,
        rolls_up=rolls_up,
        description=description,
    )
    existing = FeatureDefinition.objects.using(_database()).filter(name=name).first()
    if existing is not None:
        row.pk = existing.pk
        row.created_at = existing.created_at
    row.full_clean_definition(existing)
    row.save(using=_database())
    return row
