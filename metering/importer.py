"""File import of usage facts (``manage.py usage_import``): JSON Lines or CSV, read as a stream, written in batches
through ``metering.bulk.record_many`` (the adapter's ``record_facts``: outbox rows for the sinks included).

Each record is one event with the fields of ``POST /api/v1/events``: ``tenant_id``, ``feature_name``, ``quantity``,
``transaction_id`` (required here: it is what makes a re-run safe), and optionally ``timestamp`` (ISO-8601 with an
offset, or Unix seconds; default: now) and ``metadata`` (a JSON object; in CSV a column holding JSON text). CSV has a
header row naming the columns; an empty cell is an absent field.

Semantics: a line that cannot be parsed, or whose event is invalid, is *rejected* (reported with its line number)
and the rest of its batch is still imported; a ``transaction_id`` the tenant already has is a *duplicate* (counted,
not an error). Re-running the same file — after a crash, say — records nothing twice: every batch is one
transaction, and facts are idempotent on (tenant, transaction id). Backdated facts must fall within
``METERING["MAX_BACKDATE"]`` (the command's ``--max-backdate`` widens it for the run).
"""

from __future__ import annotations

import csv
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import IO, Any

from .api.base import parse_moment
from .events import UsageEvent
from .exceptions import InvalidBatch

FIELDS = frozenset({"tenant_id", "feature_name", "quantity", "timestamp", "metadata", "transaction_id"})
REQUIRED = ("tenant_id", "feature_name", "quantity", "transaction_id")
MAX_LINE_BYTES = 64 * 1024  # a record longer than this is rejected unread (metadata is at most a few KB)
UNIX_SECONDS = re.compile(r"-?[0-9]{1,12}(\.[0-9]{1,9})?")  # a CSV cell of Unix seconds (ASCII digits only)
REJECTS_KEPT = 10_000  # rejected lines kept for the summary (the count goes on)


class LineError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class ImportReport:
    lines: int = 0  # records read (data lines)
    imported: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    seconds: float = 0.0
    rejects: list[tuple[int, str, str]] = field(default_factory=list)  # (line, field, message)
    dry_run: bool = False

    def reject(self, line: int, field: str, message: str) -> None:
        self.rejected += 1
        if len(self.rejects) < REJECTS_KEPT:
            self.rejects.append((line, field, message))

    def as_dict(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "imported": self.imported,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "dry_run": self.dry_run,
            "rejects": [{"line": line, "field": name, "message": message} for line, name, message in self.rejects],
        }


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _event(raw: dict[str, Any]) -> UsageEvent:
    """The event of one record (``LineError`` naming the field)."""
    unknown = sorted(str(key) for key in raw if key not in FIELDS)
    if unknown:
        raise LineError(unknown[0], f"unknown field {unknown[0]!r}")
    for name in REQUIRED:
        if raw.get(name) in (None, ""):
            raise LineError(name, f"{name} is required")
    timestamp = raw.get("timestamp")
    extra: dict[str, Any] = {}
    if timestamp not in (None, ""):
        try:
            extra["timestamp"] = parse_moment(timestamp, allow_epoch=True)
        except ValueError as error:
            raise LineError("timestamp", str(error)) from None
    metadata = raw.get("metadata")
    if metadata not in (None, ""):
        extra["metadata"] = metadata
    return UsageEvent(
        tenant_id=raw["tenant_id"],
        feature_name=raw["feature_name"],
        quantity=raw["quantity"],
        transaction_id=raw["transaction_id"],
        **extra,
    )


def _jsonl(stream: IO[bytes]) -> Iterator[tuple[int, UsageEvent | LineError]]:
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            yield number, LineError("line", f"longer than {MAX_LINE_BYTES} bytes")
            continue
        try:
            raw = json.loads(line.decode("utf-8"), parse_float=Decimal, parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as error:
            yield number, LineError("line", f"not a JSON object: {error}"[:300])
            continue
        if not isinstance(raw, dict):
            yield number, LineError("line", "each line must be a JSON object")
            continue
        try:
            yield number, _event(raw)
        except LineError as error:
            yield number, error


def _csv(stream: IO[bytes]) -> Iterator[tuple[int, UsageEvent | LineError]]:
    # Decoded line by line: a line that is not UTF-8 keeps its bytes as surrogates, which the validators refuse
    # for that line only (a text stream would stop the whole file at the first bad byte).
    lines = (line.decode("utf-8", "surrogateescape") for line in stream)
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as error:
        yield 1, LineError("header", f"cannot be parsed: {error}")
        return
    header = [name.strip().lstrip("\ufeff") for name in header]
    unknown = sorted(set(header) - FIELDS)
    missing = [name for name in REQUIRED if name not in header]
    if unknown or missing or len(set(header)) != len(header):
        why = (
            f"unknown column {unknown[0]!r}"
            if unknown
            else f"missing column {missing[0]!r}"
            if missing
            else "a column twice"
        )
        yield 1, LineError("header", why)
        return
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            yield reader.line_num, LineError("line", f"cannot be parsed as CSV: {error}"[:300])
            continue
        number = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            yield number, LineError("line", f"{len(row)} cells, the header has {len(header)}")
            continue
        raw: dict[str, Any] = dict(zip(header, row, strict=True))
        if raw.get("metadata"):
            try:
                raw["metadata"] = json.loads(raw["metadata"], parse_float=Decimal, parse_constant=_reject_constant)
            except ValueError:
                yield number, LineError("metadata", "metadata must be a JSON object")
                continue
        stamp = raw.get("timestamp", "")
        if UNIX_SECONDS.fullmatch(stamp):
            raw["timestamp"] = float(stamp) if "." in stamp else int(stamp)
        try:
            yield number, _event(raw)
        except LineError as error:
            yield number, error


def records(stream: IO[bytes], fmt: str) -> Iterator[tuple[int, UsageEvent | LineError]]:
    """(line number, event or the reason the line is rejected) for every record of the stream."""
    return _csv(stream) if fmt == "csv" else _jsonl(stream)


def _batches(
    items: Iterable[tuple[int, UsageEvent | LineError]], size: int, report: ImportReport
) -> Iterator[list[tuple[int, UsageEvent]]]:
    batch: list[tuple[int, UsageEvent]] = []
    for number, item in items:
        report.lines += 1
        if isinstance(item, LineError):
            report.reject(number, item.field, str(item))
            continue
        batch.append((number, item))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_import(
    stream: IO[bytes],
    fmt: str,
    *,
    batch_size: int = 2000,
    dry_run: bool = False,
    progress: Callable[[ImportReport], None] | None = None,
) -> ImportReport:
    """Import every record of ``stream`` (see the module docstring); ``progress(report)`` after each batch."""
    from . import bulk
    from .meter import get_meter

    meter = get_meter()
    record_facts = getattr(meter, "record_facts", None)
    report = ImportReport(dry_run=dry_run)
    lineages: dict[str, Any] = {}  # resolved once per import (each write re-checks paths under its tree's lock)
    started = time.monotonic()
    for batch in _batches(records(stream, fmt), batch_size, report):
        pending = batch
        while pending:
            events = [event for _, event in pending]
            try:
                if dry_run:
                    bulk.validate_many(events, lineages=lineages)
                    result_created, result_duplicates = len(events), 0
                elif record_facts is not None:
                    result = record_facts(events, lineages=lineages)
                    result_created, result_duplicates = result.created_count, len(result.duplicates)
                else:
                    result = bulk.record_many(events, lineages=lineages)
                    result_created, result_duplicates = result.created_count, len(result.duplicates)
            except InvalidBatch as error:
                for index, problems in sorted(error.errors.items()):
                    name = next(iter(problems))
                    report.reject(pending[index][0], name, "; ".join(problems[name]))
                pending = [item for index, item in enumerate(pending) if index not in error.errors]
                continue
            report.imported += result_created
            report.duplicates += result_duplicates
            report.batches += 1
            break
        report.seconds = time.monotonic() - started
        if progress is not None:
            progress(report)
    report.rejects.sort()
    report.seconds = time.monotonic() - started
    return report
