"""The example project's settings are safe by default: no known SECRET_KEY in production."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def run(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SECRET_KEY", "DJANGO_DEBUG")}
    full = {**base, "DJANGO_SETTINGS_MODULE": "project.settings", "VAR_DIR": str(tmp_path), **env}
    return subprocess.run(
        [sys.executable, "-c", code], env=full, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def test_with_debug_off_and_no_secret_key_the_project_refuses_to_start(tmp_path):
    done = run("import django; django.setup()", tmp_path, DJANGO_DEBUG="0")
    assert done.returncode != 0
    assert "ImproperlyConfigured" in done.stderr and "DJANGO_SECRET_KEY is not set" in done.stderr


def test_with_debug_off_and_a_secret_key_it_starts_with_that_key(tmp_path):
    code = "import django; django.setup(); from django.conf import settings; print(settings.SECRET_KEY)"
    done = run(code, tmp_path, DJANGO_DEBUG="0", DJANGO_SECRET_KEY="s" * 60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "s" * 60


def test_the_development_key_is_flagged_by_check_deploy(tmp_path):
    done = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        env={**{k: v for k, v in os.environ.items() if k != "DJANGO_SECRET_KEY"}, "VAR_DIR": str(tmp_path)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "security.W009" in done.stdout + done.stderr
