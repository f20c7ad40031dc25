"""An importer in a separate OS process (spawned by test_bulk_faults), on the parent's test database and Redis.

``python -m tests.bulk_worker '<json>'`` with {"database": {...}, "caches": {...}, "metering": {...}, "file": path,
"batch_size": N, "pause_batch": K, "marker": path}: imports ``file`` (JSON Lines) and, in the K-th batch, right
before its COMMIT (facts, rollups, outbox rows written and the live counters incremented), writes ``marker`` and
sleeps until killed.
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
    from metering import bulk
    from metering.importer import run_import

    marker = Path(config["marker"])
    batches = {"n": 0}
    original = bulk.add_many_to_counters

    def counted_then_hang(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        batches["n"] += 1
        if batches["n"] == int(config["pause_batch"]):
            marker.write_text(str(os.getpid()))
            while True:
                time.sleep(1)

    bulk.add_many_to_counters = counted_then_hang
    with open(config["file"], "rb") as stream:
        report = run_import(stream, "jsonl", batch_size=int(config["batch_size"]))
    print(json.dumps(report.as_dict()))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
