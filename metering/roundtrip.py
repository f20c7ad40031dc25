"""Fewer database round trips on the hot path: a transaction's first statements sent together, BEGIN included.

Recording a fact takes a tree lock, inserts the fact and upserts one rollup row per lineage level. Sent one by one
that is five round trips (psycopg sends ``BEGIN`` on its own, then each statement, then ``COMMIT``); here it is
two: ``BEGIN; <lock>; <fact>`` in one, ``<rollups>; COMMIT`` in the other (``Batch.execute_last``), with the
quota decision in Redis between them.

- ``atomic(using)`` is ``transaction.atomic`` (savepoints, ``on_commit`` and rollback on error all as usual). When
  it opens the outermost transaction on psycopg 3 it lets the first batch carry the ``BEGIN``: psycopg decides
  whether to send ``BEGIN``, ``COMMIT`` and ``ROLLBACK`` from the server's transaction status, so the connection
  is put back in autocommit mode right before the batch's own ``BEGIN`` opens the transaction (only if nothing ran
  in the block before, and only for a plain ``BEGIN``: no isolation level or access mode configured).
- ``Batch.execute(statements)`` sends the statements as one query string when Django binds parameters on the client
  (its default on psycopg 3, ``ClientCursor``), else one by one; it returns the last one's rows. Under READ
  COMMITTED (Django's default) each statement still takes its own snapshot, so a lock taken by one is respected by
  the reads of the next.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from django.db import connections, transaction

Statement = tuple[str, Sequence[Any]]


class Batch:
    """The statements a transaction starts with. ``outermost``: this block opened Django's outermost transaction."""

    def __init__(self, using: str, outermost: bool) -> None:
        self.using = using
        self.outermost = outermost
        self.sent = False
        self.folded = False  # this batch sent the BEGIN: the transaction is ours to COMMIT

    def execute(self, statements: Sequence[Statement]) -> list[tuple[Any, ...]]:
        """Run ``statements`` in order; the rows of the last one (a statement without rows gives ``[]``)."""
        connection = connections[self.using]
        statements = list(statements)
        multi = _binds_on_client(connection)
        if multi and self.outermost and not self.sent and _fold_begin(connection):
            statements.insert(0, ("BEGIN", ()))
            self.folded = True
        self.sent = True
        with connection.cursor() as cursor:
            if multi:
                cursor.execute("; ".join(sql for sql, _ in statements), [p for _, params in statements for p in params])
                while cursor.nextset():
                    pass
            else:
                for sql, params in statements:
                    cursor.execute(sql, params)
            return list(cursor.fetchall()) if cursor.description else []

    def execute_last(self, statements: Sequence[Statement]) -> None:
        """The transaction's last statements, sent with its ``COMMIT`` when the batch opened it (one round trip
        instead of two; Django's own ``COMMIT`` then finds nothing to do). Nothing may run after them."""
        if self.folded and _binds_on_client(connections[self.using]):
            self.execute([*statements, ("COMMIT", ())])
        else:
            self.execute(statements)


def _binds_on_client(connection: Any) -> bool:
    """Django's cursors bind parameters on the client (several statements may then share one query string)."""
    if connection.vendor != "postgresql":
        return False
    connection.ensure_connection()
    raw = connection.connection
    if not _is_psycopg3(raw):
        return False
    import psycopg

    # OPTIONS["server_side_binding"] = True, or a cursor factory of the project's own, binds on the server.
    server_side = connection.settings_dict.get("OPTIONS", {}).get("server_side_binding") is True
    return not server_side and issubclass(raw.cursor_factory, psycopg.ClientCursor)


def _is_psycopg3(raw: Any) -> bool:
    try:
        import psycopg
    except ImportError:  # pragma: no cover (psycopg is a dependency; psycopg2 is not used here)
        return False
    return isinstance(raw, psycopg.Connection)


@contextmanager
def atomic(using: str) -> Iterator[Batch]:
    """``transaction.atomic(using)`` whose first ``Batch.execute`` also opens the transaction when it can."""
    connection = connections[using]
    # Only Django's usual autocommit mode: with AUTOCOMMIT off, Django never commits here and nothing is folded.
    outermost = not connection.in_atomic_block and connection.get_autocommit()
    with transaction.atomic(using=using):
        yield Batch(using, outermost)


def _fold_begin(connection: Any) -> bool:
    """Let the batch send the ``BEGIN``: only when nothing ran yet in this transaction (the server is idle) and the
    transaction is a plain one (psycopg would add an isolation level or access mode to its own ``BEGIN``)."""
    raw = connection.connection
    if raw.info.transaction_status != 0 or raw.autocommit:
        return False
    if raw.isolation_level is not None or raw.read_only is not None or raw.deferrable is not None:
        return False
    raw.autocommit = True  # Django still manages the transaction; the batch's BEGIN opens it on the server
    return True
