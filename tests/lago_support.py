"""Helpers of the delivery tests (Lago and webhook sinks): settings, recording, real Celery worker processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from metering import UsageEvent, get_meter
from metering.models import UsageOutbox

API_KEY = "lago-secret-key-0123456789"
WEBHOOK_SECRET = "webhook-secret-abcdef-987654"
# The fake Lago's expression for this metric code fails (a string error at its index, as lago-api's
# CalculateExpressionService reports it): the way the tests make Lago refuse one fact for its content.
REFUSED = "refused"
REFUSAL = "expression_evaluation_failed: undefined variable 'x'"
ORG = {"org": None, "proj": "org", "key1": "proj", "key2": "proj", "other": None}


def lago_metering(url: str, **overrides: Any) -> dict[str, Any]:
    return {
        "ADAPTER": "metering.adapters.lago.LagoMeteringAdapter",
        "SINK_URL": url,
        "API_KEY": API_KEY,
        "BATCH_SIZE": 10,
        "SINK_TIMEOUT_SECONDS": 1,
        "SINK_LEASE_SECONDS": 5,
        "SINK_RETRY_BASE_SECONDS": 0.2,
        "SINK_RETRY_MAX_SECONDS": 1,
        **overrides,
    }


def webhook_metering(url: str, **overrides: Any) -> dict[str, Any]:
    return {
        **lago_metering(url),
        "ADAPTER": "metering.adapters.webhook.WebhookMeteringAdapter",
        "API_KEY": None,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        **overrides,
    }


def delete_queue(name: str) -> None:
    from project.celery import app

    with app.connection_for_write() as conn, contextlib.suppress(Exception):  # the queue was never declared
        conn.default_channel.queue_delete(  # type: ignore[attr-defined]
            name
        )


def record(tenant_id: str, quantity: Decimal | int | str = 1, feature: str = "llm_tokens", **kwargs: Any) -> None:
    get_meter().record_usage_sync(UsageEvent(tenant_id, feature, quantity, **kwargs))


def record_many(count: int, tenant_ids: tuple[str, ...] = ("key1", "key2", "proj"), prefix: str = "tx") -> list[str]:
    """Record ``count`` facts spread over ``tenant_ids``; returns the Lago transaction ids they must arrive as."""
    expected = []
    for index in range(count):
        tenant_id = tenant_ids[index % len(tenant_ids)]
        record(tenant_id, Decimal(index + 1) / 4, transaction_id=f"{prefix}-{index}")
        expected.append(f"{tenant_id}/{prefix}-{index}")
    return expected


def states() -> dict[str, int]:
    counts: dict[str, int] = {}
    for state in UsageOutbox.objects.values_list("state", flat=True):
        counts[state] = counts.get(state, 0) + 1
    return counts


def on_postgres() -> bool:
    return connection.vendor == "postgresql"


# --- real Celery worker processes (PostgreSQL + RabbitMQ runs) ---------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 90, worker: CeleryWorker | None = None):
    """Poll until ``predicate()`` holds; a bound, not a measurement. Fails with the worker's log on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    log = worker.log_tail() if worker else ""
    raise AssertionError(f"timed out waiting for {what}; outbox: {states()}\n{log}")


def worker_database_url() -> str:
    db = connection.settings_dict
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


class CeleryWorker:
    """``celery -A project worker`` (prefork, 2 processes) in its own process group, on the test database."""

    def __init__(self, metering: dict[str, Any], *, beat: bool, tmp: Path, name: str) -> None:
        self.metering = metering
        self.beat = beat
        self.tmp = tmp
        self.name = name
        self.log_path = tmp / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> CeleryWorker:
        queue = self.metering["CELERY_QUEUE"]
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.lago_worker_settings",
            "DATABASE_URL": worker_database_url(),
            "LAGO_TEST_METERING": json.dumps(self.metering),
            "METERING_SWEEP_SECONDS": "0.5",
            "PYTHONUNBUFFERED": "1",
        }
        command = [
            str(REPO / ".venv" / "bin" / "celery"),
            "-A",
            "project",
            "worker",
            "--pool",
            "prefork",
            "-c",
            "2",
            "-Q",
            queue,
            "-n",
            f"{self.name}-{uuid.uuid4().hex[:6]}@%h",
            "--without-gossip",
            "--without-mingle",
            "-l",
            "INFO",
        ]
        if self.beat:
            command += ["-B", "-s", str(self.tmp / f"{self.name}-beat-schedule")]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return self

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_count(self, *parts: str) -> int:
        """Lines of the worker's log holding every one of ``parts``."""
        if not self.log_path.exists():
            return 0
        lines = self.log_path.read_text(errors="replace").splitlines()
        return sum(1 for line in lines if all(part in line for part in parts))

    def kill(self) -> None:
        """SIGKILL the whole worker: main process, pool processes and embedded beat."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        # the pool processes of a stopped worker must not outlive it (they hold database connections)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


def require_worker_services() -> None:
    from tests.conftest import require

    if connection.vendor != "postgresql":
        pytest.skip("real Celery workers run in the PostgreSQL configuration (make test runs both)")
    require("rabbitmq")
    if not os.environ.get("CELERY_BROKER_URL", "").startswith("amqp"):
        pytest.skip("real Celery workers need CELERY_BROKER_URL=amqp://... (the PostgreSQL run sets it)")
