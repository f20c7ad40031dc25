"""The suite runs under its own settings (``tests.settings``), which must agree with the example project's wherever
a test's processes of the example site share state with the test process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent.parent
SHARED = ("SECRET_KEY", "INSTALLED_APPS", "MIDDLEWARE", "REST_FRAMEWORK", "SPECTACULAR_SETTINGS", "USE_TZ")
DUMP = """
import importlib, json, sys
module = importlib.import_module(sys.argv[1])
SHARED = json.loads(sys.argv[2])
cache = module.CACHES["default"]
database = module.DATABASES["default"]
print(json.dumps({
    **{name: getattr(module, name) for name in SHARED},
    "KEY_PREFIX": cache.get("KEY_PREFIX"),
    "CACHE_OPTIONS": cache.get("OPTIONS"),
    "DATABASE": {key: str(value) for key, value in database.items() if key != "TEST"},
    "CELERY": [module.CELERY_BROKER_URL, module.CELERY_TASK_ALWAYS_EAGER],
}, default=str))
"""


def settings_of(module: str, **env: str) -> dict[str, object]:
    clean = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DJANGO_", "METERING_", "DATABASE_", "REDIS_", "CACHE_", "CELERY_"))
    }
    done = subprocess.run(
        [sys.executable, "-c", DUMP, module, json.dumps(SHARED)],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)


def test_the_suite_runs_under_its_own_settings():
    assert os.environ["DJANGO_SETTINGS_MODULE"] == "tests.settings"
    assert settings.SETTINGS_MODULE == "tests.settings"


def test_embedded_and_services_settings_agree_with_the_example_projects(tmp_path):
    embedded = {"VAR_DIR": str(tmp_path)}
    services = {
        **embedded,
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/anything",
        "REDIS_URL": "redis://127.0.0.1:6379/3",
        "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
    }
    for env in (embedded, services):
        ours, example = settings_of("tests.settings", **env), settings_of("project.settings", **env)
        if "REDIS_URL" not in env:  # the local-memory cache is per process: its name is nobody else's business
            ours.pop("CACHE_OPTIONS"), example.pop("CACHE_OPTIONS")
        assert ours == example
