"""``manage.py usage_import FILE``: import usage facts from JSON Lines or CSV (``-``: stdin), resumably."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from typing import IO, Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.test.utils import override_settings

from metering.importer import ImportReport, run_import

SHOWN_REJECTS = 50  # rejected lines printed in the summary (--json lists up to importer.REJECTS_KEPT)


def _max_backdate(value: str) -> timedelta | None:
    """``--max-backdate``: days (``400``), or ``none`` for no bound (back to 1970)."""
    if value.strip().lower() == "none":
        return None
    try:
        days = float(value)
    except ValueError:
        raise CommandError(f"--max-backdate must be a number of days or 'none', got {value!r}") from None
    if not 0 < days <= 3_650_000:
        raise CommandError("--max-backdate must be above 0 days")
    return timedelta(days=days)


class Command(BaseCommand):
    help = (
        "Import usage facts from a JSON Lines or CSV file ('-' reads stdin) in batches, each one transaction through "
        "the configured adapter (sinks receive them like any fact). Re-running the same file records nothing twice "
        "(idempotent on tenant + transaction_id). Progress (events/s, ETA) goes to stderr; the summary to stdout. "
        "Exits 1 when any line was rejected. See metering/importer.py for the record format."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", help="The file to import, or '-' for stdin.")
        parser.add_argument(
            "--format", choices=["auto", "jsonl", "csv"], default="auto", help="Default: from the file's extension."
        )
        parser.add_argument("--batch-size", type=int, default=2000, help="Events per transaction (default 2000).")
        parser.add_argument("--dry-run", action="store_true", help="Validate every line; store nothing.")
        parser.add_argument(
            "--max-backdate",
            help="Widen METERING['MAX_BACKDATE'] for this run: days, or 'none' (historical backfills).",
        )
        parser.add_argument("--no-progress", action="store_true", help="No progress line on stderr.")
        parser.add_argument("--json", action="store_true", help="Print the summary as JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        path: str = options["file"]
        fmt: str = options["format"]
        if fmt == "auto":
            fmt = "csv" if path.lower().endswith(".csv") else "jsonl"
        size = options["batch_size"]
        if not 1 <= size <= 100_000:
            raise CommandError("--batch-size must be 1 to 100000")
        overrides: dict[str, Any] = {}
        if options["max_backdate"] is not None:
            overrides["MAX_BACKDATE"] = _max_backdate(options["max_backdate"])
        total = None
        if path == "-":
            stream: IO[bytes] = sys.stdin.buffer
        else:
            try:
                stream = open(path, "rb")  # noqa: SIM115 (closed below)
            except OSError as error:
                raise CommandError(f"cannot open {path!r}: {error.strerror}") from None
            total = os.fstat(stream.fileno()).st_size or None
        show = None if options["no_progress"] else self._progress(stream, total)
        try:
            if overrides:
                current = {**getattr(settings, "METERING", {}), **overrides}
                with override_settings(METERING=current):
                    report = run_import(stream, fmt, batch_size=size, dry_run=options["dry_run"], progress=show)
            else:
                report = run_import(stream, fmt, batch_size=size, dry_run=options["dry_run"], progress=show)
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()
        if show is not None:
            self.stderr.write("")
        self._summary(report, options["json"])
        if report.rejected:
            raise CommandError(f"{report.rejected} line(s) rejected (see the summary); the rest was imported")

    def _progress(self, stream: IO[bytes], total: int | None) -> Any:
        last = [0.0]

        def show(report: ImportReport) -> None:
            now = time.monotonic()
            if now - last[0] < 0.5:
                return
            last[0] = now
            rate = (report.imported + report.duplicates) / report.seconds if report.seconds else 0.0
            eta = ""
            if total:
                try:
                    done = stream.tell() / total
                except OSError:
                    done = 0.0
                if 0 < done < 1:
                    eta = f"  {done:6.1%}  ETA {report.seconds * (1 - done) / done:,.0f} s"
            self.stderr.write(
                f"\r{report.lines:,} lines: {report.imported:,} imported, {report.duplicates:,} duplicates, "
                f"{report.rejected:,} rejected  {rate:,.0f} events/s{eta}   ",
                ending="",
            )
            self.stderr.flush()

        return show

    def _summary(self, report: ImportReport, as_json: bool) -> None:
        if as_json:
            self.stdout.write(json.dumps(report.as_dict()))
            return
        verb = "would import" if report.dry_run else "imported"
        rate = (report.imported + report.duplicates) / report.seconds if report.seconds else 0.0
        self.stdout.write(
            f"{report.lines} lines: {verb} {report.imported}, duplicates {report.duplicates}, rejected "
            f"{report.rejected} in {report.seconds:.1f} s ({rate:,.0f} events/s)"
        )
        for line, name, message in report.rejects[:SHOWN_REJECTS]:
            self.stdout.write(f"  line {line}: {name}: {message}")
        if report.rejected > SHOWN_REJECTS:
            self.stdout.write(f"  ... and {report.rejected - SHOWN_REJECTS} more (--json lists them)")
