"""The namespace of every Redis and cache key the product writes, so that several sites can share one Redis.

Two sites with identical settings apart from their database (same ``KEY_PREFIX``, same tenant ids, same primary
keys) must never read each other's counters, rules, lineages or guards. Keys are therefore namespaced by the
*site's identity*: the metering cache's ``KEY_PREFIX`` and the identity of the database usage is written to
(``NAME``, ``HOST`` and ``PORT`` of ``METERING["DATABASE_ALIAS"]``). ``METERING["REDIS_NAMESPACE"]`` replaces that
identity with a name of the operator's choosing (e.g. two aliases that reach one database through different hosts,
or a database renamed while its counters should carry over).

Key shapes:

- counters (``metering.counters``): ``xaas:<label>:{<hash>.t<root pk>}:e<epoch>:<kind>:<tenant pk>:...``. The hash
  tag ``{<hash>.t<root>}`` keeps one tree of one site in one Redis Cluster slot (one script touches every level of a
  lineage), and a different site's tree in another tag. ``<hash>`` is 12 hex digits of SHA-256 of the identity;
  ``<label>`` is a readable form of the ``KEY_PREFIX`` (or of the override) for people reading ``redis-cli`` output,
  restricted to ``[A-Za-z0-9._-]`` so that neither a ``{``/``}`` (which would move the Cluster hash tag) nor a glob
  character (``SCAN MATCH``) nor a ``:`` can come from settings. ``-`` when empty.
- cache entries (lineages, rules, threshold guards, outbox triggers): ``xaas:<hash>:<what>:...`` through the Django
  cache, which adds its own ``KEY_PREFIX`` in front.

Computed at use time from the settings (so ``override_settings`` works), memoized on the tuple of its inputs.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache

from django.conf import settings
from django.db import connections

HASH_DIGITS = 12
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True, slots=True)
class Namespace:
    label: str  # readable, never ``{ } : * ? [ ] \``
    hash: str  # hex digits of the site's identity

    @property
    def counter_prefix(self) -> str:
        """What every counter key of this site starts with (before its hash tag)."""
        return f"xaas:{self.label}:"

    def tree_tag(self, root_pk: int) -> str:
        """``xaas:<label>:{<hash>.t<root>}``: the start of every counter key of one tree of this site."""
        return f"{self.counter_prefix}{{{self.hash}.t{root_pk}}}"

    def cache_key(self, *parts: object) -> str:
        """A Django cache key of this site: ``xaas:<hash>:<part>:<part>...``."""
        return ":".join(("xaas", self.hash, *(str(part) for part in parts)))


def _identity() -> tuple[str, ...]:
    metering = getattr(settings, "METERING", {})
    override = metering.get("REDIS_NAMESPACE")
    if override:
        return ("override", str(override))
    cache_alias = metering.get("CACHE_ALIAS", "default")
    key_prefix = str(settings.CACHES.get(cache_alias, {}).get("KEY_PREFIX", "") or "")
    # Read from the connection's live settings: the test runner renames the database there (test_<name>).
    database = connections[metering.get("DATABASE_ALIAS", "default")].settings_dict
    return (
        "site",
        key_prefix,
        str(database.get("NAME") or ""),
        str(database.get("HOST") or ""),
        str(database.get("PORT") or ""),
    )


@lru_cache(maxsize=64)
def _namespace(identity: tuple[str, ...]) -> Namespace:
    digest = hashlib.sha256("\x00".join(identity).encode()).hexdigest()[:HASH_DIGITS]
    label = _UNSAFE.sub("_", identity[1])[:64] or "-"  # the override, or the KEY_PREFIX
    return Namespace(label=label, hash=digest)


def current() -> Namespace:
    """This site's namespace, from the settings as they are now."""
    return _namespace(_identity())
