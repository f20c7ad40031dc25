"""Settings of the Celery worker processes that test_lago_worker.py starts: the example project's, plus the METERING
keys and the private queue the test passes in the environment (LAGO_TEST_METERING, JSON)."""

import json
import os

from project.settings import *  # noqa: F403
from project.settings import METERING as BASE_METERING

METERING = {**BASE_METERING, **json.loads(os.environ.get("LAGO_TEST_METERING", "{}"))}
CELERY_TASK_DEFAULT_QUEUE = METERING.get("CELERY_QUEUE") or "celery"
CELERY_BEAT_SCHEDULE = {
    "metering-sweep-outbox": {
        "task": "metering.sweep_outbox",
        "schedule": float(os.environ.get("METERING_SWEEP_SECONDS", "1")),
        "options": {"queue": CELERY_TASK_DEFAULT_QUEUE},
    },
}
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"metering": {"handlers": ["console"], "level": "INFO"}},
}
# Each task closes its database connection: a stopped or killed worker leaves no session behind that could keep
# pytest-django from dropping the test database.
DATABASES["default"]["CONN_MAX_AGE"] = 0  # noqa: F405
