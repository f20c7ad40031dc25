"""Fewer database round trips on the hot path: a transaction's first statements sent together, BEGIN included.

Recording a fact takes a tree lock, inserts the fact and upserts one rollup row per lineage level. Sent one by one
that is five round trips (psycopg sends ``BEGIN`` on its own, then each statement, then ``COMMIT``); here it is
two: ``BEGIN; <lock>; <fact and rollups>`` in one, ``COMMIT`` in the other.

- ``atomic(using)`` is ``transaction.atomic`` (savepoints, ``on_commit`` and rollback on error all as usual). When
  it opens the outermost transaction on psycopg 3 it lets the first batch carry the ``BEGIN``: psycopg decides
  whether to send ``BEGIN``, ``COMMIT`` and ``ROLLBACK`` from the server's transaction status, so the connection
  is put back in autocommit mode until the batch's own ``BEGIN`` opens the transaction. So the batch's
  ``execute`` must be the first thing run inside the block.
- ``Batch.execute(statements)`` sends the statements as one query string when Django binds parameters on the client
  (its default on psycopg 3, ``ClientCursor``), else one by one; it returns the last one's rows. Each statement
  still takes its own snapshot, so a lock taken by one is respected by the reads of the next.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from django.db import connections, transaction

Statement = tuple[str, Sequence[Any]]


class Batch:
    """The statements a transaction starts with. ``begin``: the first batch must open the transaction itself."""

    def __init__(self, using: str, begin: bool) -> None:
        self.using = using
        self.begin = begin

    def execute(self, statements: Sequence[Statement]) -> list[tuple[Any, ...]]:
        """Run ``statements`` in order; the rows of the last one (a statement without rows gives ``[]``)."""
        connection = connections[self.using]
        statements = list(statements)
        if self.begin:
            statements.insert(0, ("BEGIN", ()))
            self.begin = False
        with connection.cursor() as cursor:
            if _binds_on_client(connection):
                cursor.execute("; ".join(sql for sql, _ in statements), [p for _, params in statements for p in params])
                while cursor.nextset():
                    pass
            else:
                for sql, params in statements:
                    cursor.execute(sql, params)
            return list(cursor.fetchall()) if cursor.description else []


def _binds_on_client(connection: Any) -> bool:
    if connection.vendor != "postgresql":
        return False
    connection.ensure_connection()
    return _is_psycopg3(connection.connection) and _client_cursor(connection)


def _is_psycopg3(raw: Any) -> bool:
    try:
        import psycopg
    except ImportError:  # pragma: no cover (psycopg is a dependency; psycopg2 is not used here)
        return False
    return isinstance(raw, psycopg.Connection)


def _client_cursor(connection: Any) -> bool:
    # Django binds on the client unless OPTIONS["server_side_binding"] is True (then one query, one statement).
    return connection.settings_dict.get("OPTIONS", {}).get("server_side_binding") is not True


@contextmanager
def atomic(using: str) -> Iterator[Batch]:
    """``transaction.atomic(using)`` whose first ``Batch.execute`` also opens the transaction when it can."""
    connection = connections[using]
    # Only Django's usual autocommit mode: with AUTOCOMMIT off, Django never commits here and nothing is folded.
    outermost = not connection.in_atomic_block and connection.get_autocommit()
    with transaction.atomic(using=using):
        yield Batch(using, begin=outermost and _can_fold_begin(connection))


def _can_fold_begin(connection: Any) -> bool:
    if connection.vendor != "postgresql" or not _client_cursor(connection):
        return False
    raw = connection.connection
    if not _is_psycopg3(raw) or raw.info.transaction_status != 0:
        return False  # not psycopg 3, or not idle: let psycopg open the transaction as usual
    raw.autocommit = True  # Django still manages the transaction; the batch's BEGIN opens it on the server
    return True
