"""Per-tree locks that order writers of usage against rebuilders of counters and movers of subtrees.

Writers of usage take a tree's lock *shared* (they run concurrently); rebuilding a cached counter from the
database or moving a subtree takes it *exclusive*, which waits until every in-flight writer of that tree has
committed or rolled back. On PostgreSQL these are transaction-scoped advisory locks (no rows, no bloat). SQLite
serializes writers itself when ``transaction_mode`` is ``IMMEDIATE`` (see the ``xaas_tenants.W001`` check), so
there the lock is a no-op.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from django.db import connections

# Advisory lock keys are (namespace, tree root pk); the namespace keeps ours apart from a host project's.
ADVISORY_NAMESPACE = 0x58414153  # "XAAS"
NAMED_NAMESPACE = 0x58414154


Statement = tuple[str, list[int]]


def lock_trees(root_pks: Iterable[int], *, exclusive: bool, using: str = "default") -> None:
    """Lock the trees rooted at ``root_pks`` until the current transaction ends. Call inside ``atomic()``."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        # Sorted, so two movers locking the same pair of trees never deadlock.
        for root_pk in sorted(set(root_pks)):
            cursor.execute(*tree_lock_statement(root_pk, exclusive=exclusive))


def tree_lock_statement(root_pk: int, *, exclusive: bool) -> Statement:
    """The SQL of ``lock_trees([root_pk])`` on PostgreSQL, to send along with other statements."""
    function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    return f"SELECT {function}(%s, %s)", [ADVISORY_NAMESPACE, _int4(root_pk)]


def lock_name(name: str, *, using: str = "default") -> None:
    """Exclusive transaction lock on an arbitrary name (e.g. one tree's quota decisions on one feature)."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute(*name_lock_statement(name))


def name_lock_statement(name: str) -> Statement:
    """The SQL of ``lock_name(name)`` on PostgreSQL."""
    return "SELECT pg_advisory_xact_lock(%s, %s)", [NAMED_NAMESPACE, _int4(zlib.crc32(name.encode()))]


def _int4(value: int) -> int:
    # The two-key form takes int4 keys; fold larger primary keys into range deterministically.
    return ((value + 2**31) % 2**32) - 2**31
