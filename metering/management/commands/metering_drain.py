"""``manage.py metering_drain``: the log-mode drainer as a long-running service (or one pass with ``--once``)."""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connections

from metering import drain, log
from metering.conf import metering_settings

logger = logging.getLogger("metering.drain")
MAX_BACKOFF_SECONDS = 5.0


class Command(BaseCommand):
    verbosity = 1
    help = (
        "Persist log mode's Redis streams into the database (METERING['WRITE_MODE'] = 'log'). Runs until SIGTERM or "
        "SIGINT, which finish the batch in flight; several may run at once (each tree is drained by one at a time)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="One pass over the work list, then exit.")
        parser.add_argument("--max-batches", type=int, help="Exit after this many batches (committed transactions).")
        parser.add_argument(
            "--idle",
            type=float,
            help="Seconds to sleep when nothing was due (default METERING['LOG_DRAIN_IDLE_SECONDS']).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        self.verbosity = int(options["verbosity"])
        limit = options["max_batches"]
        if limit is not None and limit < 1:
            raise CommandError("--max-batches must be positive")
        idle = float(metering_settings.LOG_DRAIN_IDLE_SECONDS if options["idle"] is None else options["idle"])
        if idle < 0:
            raise CommandError("--idle must not be negative")
        if not log.is_log_mode():
            self.stderr.write("note: METERING['WRITE_MODE'] is not 'log'; draining what the streams hold anyway")
        stopping: list[int] = []

        def stop(number: int, frame: FrameType | None) -> None:
            stopping.append(number)  # the batch in flight commits; no new one starts
            logger.info("metering_drain: signal %s, stopping after the batch in flight", number)

        previous = {number: signal.signal(number, stop) for number in (signal.SIGTERM, signal.SIGINT)}
        total = drain.DrainReport()
        backoff = idle or 0.1
        started = time.monotonic()
        try:
            while not stopping:
                budget = None if limit is None else limit - total.batches
                try:
                    report = drain.drain(budget=budget, should_stop=lambda: bool(stopping))
                except (drain.LogUnavailable, DatabaseError) as error:
                    if options["once"]:
                        raise CommandError(f"draining failed: {error}") from error
                    logger.warning("metering_drain: %s; retrying in %.1fs", error, backoff)
                    connections.close_all()  # a broken connection is not reused
                    time.sleep(backoff)
                    backoff = min(MAX_BACKOFF_SECONDS, backoff * 2)
                    continue
                backoff = idle or 0.1
                total.add(report)
                if report.entries or report.gaps:
                    self._log(report)
                if options["once"] or (limit is not None and total.batches >= limit):
                    break
                if not report.more:
                    time.sleep(idle)
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
        total.seconds = time.monotonic() - started
        self._log(total, final=True)

    def _log(self, report: drain.DrainReport, *, final: bool = False) -> None:
        rate = report.facts / report.seconds if report.seconds > 0 else 0.0
        line = (
            f"{'total: ' if final else ''}{report.facts} facts persisted ({report.entries} entries, "
            f"{report.duplicates} duplicates, {report.dead} dead) in {report.batches} batches over {report.trees} "
            f"trees, {report.seconds:.2f}s ({rate:,.0f} facts/s); {report.waiting} entries waiting"
            f"{f', {report.skipped} trees held by another drainer' if report.skipped else ''}"
            f"{f', {report.gaps} LOG GAPS (see metering_status)' if report.gaps else ''}"
        )
        logger.info("metering_drain: %s", line)
        if final or self.verbosity > 1:
            self.stdout.write(line)
