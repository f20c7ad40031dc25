"""Log mode's Redis layout: the tree's stream of facts, its state, and how one entry is encoded.

In ``METERING["WRITE_MODE"] = "log"`` an admitted fact is not written to the database by the request: one Lua call
decides every quota, counts, de-duplicates the transaction id and appends the fact to its tree's stream; the drainer
(``metering.drain``) persists the stream in batches. Every key of a tree shares the tree's hash tag
(``counters.tree_tag``), so one script can touch them all on Redis Cluster.

Keys of tree ``R`` (``<tag>`` = ``counters.tree_tag(R)``):

- ``<tag>:log`` — the stream. One entry per admitted fact, fields below. Entries are deleted only after the drainer
  committed their facts (ids <= the tree's ``LogCursor.last_entry``).
- ``<tag>:state`` — a hash: ``gen`` (the stream's generation, a random id also stored in ``LogCursor``) and
  ``epoch`` (the tree's counter epoch as Redis knows it; a script called with another epoch answers "stale").
  Missing: Redis lost the tree's log state (new server, flush): the tree is reopened (``LogGap`` if entries may be
  lost) and its counters are rebuilt.
- ``<tag>:retired`` — a set of the tree's epochs that Redis's state held and no longer does (``metering.appender``:
  a late push of an older epoch is refused, so counters that missed later writes never come back).
- ``<tag>:tx:<tenant pk>:<transaction id>`` — the de-duplication window (``LOG_DEDUP_SECONDS``); value: the id of
  the stream entry that holds the fact.
- The counters are ``metering.counters``' keys, unchanged.

Outside any tree's slot: ``<prefix>:log:trees`` — a set of root pks whose stream may hold entries (the drainer's
work list; a tree is listed by the writer the first time it appends, see ``LISTED``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tenants import namespace

from . import counters

STREAM = "log"
STATE = "state"
LISTED = "listed"  # <tag>:listed, a flag with a TTL: the tree is in the work list (saves the SADD round trip)
LISTED_SECONDS = 300


def stream_key(root_pk: int) -> str:
    return f"{counters.tree_tag(root_pk)}:{STREAM}"


def state_key(root_pk: int) -> str:
    return f"{counters.tree_tag(root_pk)}:{STATE}"


def listed_key(root_pk: int) -> str:
    return f"{counters.tree_tag(root_pk)}:{LISTED}"


def retired_key(root_pk: int) -> str:
    return f"{counters.tree_tag(root_pk)}:retired"


def dedup_key(root_pk: int, tenant_pk: int, transaction_id: str) -> str:
    return f"{counters.tree_tag(root_pk)}:tx:{tenant_pk}:{transaction_id}"


def trees_key() -> str:
    """The drainer's work list (not in any tree's slot)."""
    return f"{namespace.current().counter_prefix}{{{namespace.current().hash}}}.log:trees"


def micros(moment: datetime) -> int:
    """A UTC datetime as integer microseconds since the epoch (exact, unlike a float)."""
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int | str | bytes) -> datetime:
    number = int(value)
    seconds, rest = divmod(number, 1_000_000)
    return datetime.fromtimestamp(seconds, tz=UTC).replace(microsecond=rest)


@dataclass(frozen=True, slots=True)
class Entry:
    """One fact in a tree's stream. Field names on the wire are one letter (``encode``/``decode``).

    ``path``: the lineage's pks root first as ``"/1/5/9/"`` (the tenant last), as the writer saw it under ``epoch``;
    the drainer rolls facts up by the tenant's lineage *at drain time* (a move in between is followed).
    ``reservation``: the pk of the ``QuotaReservation`` this fact commits, if any.
    """

    tenant_pk: int
    path: str
    feature: str
    units: int
    timestamp: datetime
    transaction_id: str
    recorded_at: datetime
    epoch: int
    metadata: dict[str, Any] = field(default_factory=dict)
    reservation: int | None = None
    entry_id: str = ""  # the stream id, once read back

    def encode(self) -> list[str]:
        """XADD field/value pairs, flat: [name, value, name, value, ...] (every value a string)."""
        pairs = [
            "t", str(self.tenant_pk),
            "p", self.path,
            "f", self.feature,
            "u", str(self.units),
            "ts", str(micros(self.timestamp)),
            "x", self.transaction_id,
            "at", str(micros(self.recorded_at)),
            "e", str(self.epoch),
            "m", json.dumps(self.metadata, separators=(",", ":"), ensure_ascii=False) if self.metadata else "",
        ]  # fmt: skip
        if self.reservation is not None:
            pairs += ["rv", str(self.reservation)]
        return pairs

    @classmethod
    def decode(cls, entry_id: str | bytes, fields: dict[Any, Any]) -> Entry:
        """From XRANGE's (id, {field: value}) with bytes or str keys and values."""

        def text(value: Any) -> str:
            return value.decode("utf-8") if isinstance(value, bytes) else str(value)

        values = {text(name): text(value) for name, value in fields.items()}
        return cls(
            tenant_pk=int(values["t"]),
            path=values["p"],
            feature=values["f"],
            units=int(values["u"]),
            timestamp=from_micros(values["ts"]),
            transaction_id=values["x"],
            recorded_at=from_micros(values["at"]),
            epoch=int(values["e"]),
            metadata=json.loads(values["m"]) if values.get("m") else {},
            reservation=int(values["rv"]) if values.get("rv") else None,
            entry_id=text(entry_id),
        )

    @property
    def lineage_pks(self) -> list[int]:
        return [int(part) for part in self.path.strip("/").split("/")]


def path_of(lineage_pks: list[int]) -> str:
    return "/" + "/".join(str(pk) for pk in lineage_pks) + "/"


def mode() -> str:
    """``"commit"`` or ``"log"`` (``METERING["WRITE_MODE"]``, read at use time)."""
    from .conf import metering_settings

    return str(metering_settings.WRITE_MODE)


def is_log_mode() -> bool:
    return mode() == "log"
