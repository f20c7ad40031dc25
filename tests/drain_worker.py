"""A drainer in a separate OS process (spawned by test_log_drain_faults), on the parent's test database and Redis.

``python -m tests.drain_worker '<json>'`` with {"database": {...NAME/HOST/PORT...}, "caches": {...}, "metering":
{...}, "mode": ..., "marker": path}. Modes:
- ``run``: drain until the work list is empty (or ``seconds`` pass), print the totals as JSON;
- ``pause_before_commit``: drain, and in the ``pause_batch``-th batch, right before its COMMIT (the cursor update
  is its last statement), write ``marker`` and sleep until killed;
- ``pause_after_commit``: the same right after that batch committed, before its entries leave the stream;
- ``command``: ``manage.py metering_drain`` with ``args`` (``marker`` written when it starts).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def main(config: dict[str, Any]) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    from django.conf import settings

    settings.DATABASES["default"].update(
        {key: config["database"][key] for key in ("NAME", "HOST", "PORT", "USER") if key in config["database"]}
    )
    settings.CACHES = config["caches"]
    settings.METERING = {**settings.METERING, **config["metering"]}
    from django.db import connection

    from metering import drain

    mode, marker = config["mode"], Path(config.get("marker") or "/nonexistent")
    batches = {"n": 0}

    def hang() -> None:
        marker.write_text(str(os.getpid()))
        while True:
            time.sleep(1)

    if mode == "pause_before_commit":

        def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
            if sql.startswith("UPDATE") and "logcursor" in sql:
                batches["n"] += 1
                if batches["n"] == int(config.get("pause_batch", 1)):
                    result = execute(sql, params, many, context)
                    hang()
                    return result
            return execute(sql, params, many, context)

        connection.execute_wrappers.append(wrapper)
    elif mode == "pause_after_commit":
        original = drain._after_commit

        def after_commit(*args: Any) -> None:
            batches["n"] += 1
            if batches["n"] == int(config.get("pause_batch", 1)):
                hang()
            original(*args)

        drain._after_commit = after_commit  # type: ignore[assignment]
    if mode == "command":
        from django.core.management import call_command

        marker.write_text(str(os.getpid()))
        call_command("metering_drain", *config.get("args", []))
        from django.db import connections

        connections.close_all()
        return
    total = drain.DrainReport()
    deadline = time.monotonic() + float(config.get("seconds", 60))
    while time.monotonic() < deadline:
        report = drain.drain(delay=0)
        total.add(report)
        if not drain.listed_trees(drain.counters.client()):
            break
        if not report.entries:
            time.sleep(0.02)
    print(json.dumps(total.as_dict()))
    from django.db import connections

    connections.close_all()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
    sys.exit(0)
