"""``manage.py metering_flush``: deliver the outbox now, in this process, with a progress bar."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from metering.delivery import deliver, outbox
from metering.delivery.sinks import SinkNotConfigured, get_sink

BAR_WIDTH = 30


class Command(BaseCommand):
    help = (
        "Deliver every due fact of the configured sink (Lago or webhook) synchronously, then print what happened. "
        "Exits with status 1 when delivery is blocked or facts are left to retry."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--sink", help="The sink to flush (default: the first configured; any of METERING['SINKS'])."
        )
        parser.add_argument("--max-batches", type=int, help="Stop after this many batches.")
        parser.add_argument("--resume", action="store_true", help="Lift a block (401/403/404) first.")
        parser.add_argument(
            "--release-held", action="store_true", help="Queue held facts whose tenant got a subscription."
        )
        parser.add_argument("--resend-dead", action="store_true", help="Queue every dead letter again first.")
        parser.add_argument(
            "--purge-delivered-days",
            type=int,
            metavar="DAYS",
            help="Afterwards, delete outbox rows delivered more than DAYS days ago (the facts stay).",
        )
        parser.add_argument(
            "--backfill",
            action="store_true",
            help="First queue every fact that has no outbox row for this sink yet (a sink added to SINKS later).",
        )
        parser.add_argument("--no-progress", action="store_true", help="No progress bar.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["max_batches"] is not None and options["max_batches"] < 1:
            raise CommandError("--max-batches must be positive")
        if options["purge_delivered_days"] is not None and options["purge_delivered_days"] < 0:
            raise CommandError("--purge-delivered-days must not be negative")
        try:
            sink = get_sink(options["sink"])
        except SinkNotConfigured as error:
            raise CommandError(str(error)) from error
        if sink is None:
            raise CommandError("the configured METERING['ADAPTER'] has no outbox: nothing to deliver")
        if options["resume"]:
            resumed = deliver.resume(sink.name)
            self.stdout.write(f"{sink.name}: delivery resumed" if resumed else f"{sink.name}: was not blocked")
        if options["backfill"]:
            self.stdout.write(f"{sink.name}: {outbox.backfill(sink.name)} facts queued by the backfill")
        if options["resend_dead"]:
            count = outbox.resend(outbox.UsageOutbox.objects.filter(sink=sink.name, state=outbox.DEAD))
            self.stdout.write(f"{count} dead letters queued again")
        if options["release_held"]:
            self.stdout.write(f"{outbox.release_held(sink.name)} held facts released")
        total = outbox.status(sink.name).due
        show = not options["no_progress"] and total > 0
        report = deliver.flush(
            sink.name, max_batches=options["max_batches"], progress=self._progress(total) if show else None
        )
        if show:
            self.stdout.write("")
        # What this flush did is not all the outbox holds: facts held or dead before it stay so. Say both.
        after = outbox.status(sink.name)
        held, dead = after.counts.get(outbox.HELD, 0), after.counts.get(outbox.DEAD, 0)
        if held or dead:
            self.stdout.write(
                f"{sink.name} outbox: {held} held in all"
                f"{' (no subscription yet: --release-held once they have one)' if held else ''}, {dead} dead in all"
                f"{' (metering_status lists them; --resend-dead)' if dead else ''}"
            )
        self.stdout.write(
            f"{sink.name}: {report.delivered} delivered ({report.already_present} already there) in {report.requests} "
            f"requests, {report.dead} dead, {report.held} held, {report.retrying} to retry"
        )
        if options["purge_delivered_days"] is not None:
            before = timezone.now() - timedelta(days=options["purge_delivered_days"])
            self.stdout.write(f"{outbox.purge_delivered(sink.name, before)} delivered outbox rows purged")
        if report.blocked:
            raise CommandError(f"{sink.name}: delivery is blocked: {report.blocked}", returncode=1)
        if report.retry_in is not None:
            raise CommandError(
                f"{sink.name}: transient failure, {report.retrying} facts retried in {report.retry_in:.1f}s",
                returncode=1,
            )

    def _progress(self, total: int) -> deliver.Progress:
        def show(report: deliver.FlushReport) -> None:
            done = min(report.done, total)
            filled = BAR_WIDTH * done // total if total else BAR_WIDTH
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            self.stdout.write(f"\r[{bar}] {done}/{total}", ending="")
            self.stdout.flush()

        return show
