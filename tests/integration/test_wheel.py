"""The plugin as a host project gets it: the built wheel, installed into a fresh virtualenv beside a fresh
``django-admin startproject``, configured with the README's install section as written, answers 429.

No network: the wheel is built without build isolation (setuptools comes from the dev environment), installed with
``--no-index``, and its runtime dependencies — exactly the closure of the wheel's own ``Requires-Dist``, nothing
more — are linked in from the dev environment. So a dependency missing from the wheel's metadata fails here, and a
test tool the wheel does not ask for (pytest-django, dj-database-url ...) is not importable in the fresh project.
"""

from __future__ import annotations

import email
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.doc_snippets import run_by

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = {"django", "djangorestframework", "django-redis", "redis", "celery", "psycopg", "httpx", "drf-spectacular"}
NOT_AT_RUNTIME = {"pytest", "pytest-django", "dj-database-url", "hypothesis", "gunicorn", "playwright"}
IGNORED = shutil.ignore_patterns(".venv", "var", ".git", "__pycache__", "*.egg-info", "build", "dist", "*.pyc")


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(arg) for arg in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{args}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source") / "checkout"
    shutil.copytree(ROOT, source, ignore=IGNORED)  # the whole checkout: the example project must stay out by config
    dist = tmp_path_factory.mktemp("dist")
    _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, source, cwd=source
    )
    (built,) = dist.glob("django_xaas_metering-*.whl")
    return built


def _marker_env(extra: str) -> dict[str, str]:
    environment: dict[str, str] = {key: str(value) for key, value in default_environment().items()}
    environment["extra"] = extra
    return environment


def _requirements(metadata: email.message.Message) -> list[Requirement]:
    return [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]


def _runtime_names(requirements: list[Requirement]) -> set[str]:
    environment = _marker_env("")
    return {
        canonicalize_name(req.name) for req in requirements if req.marker is None or req.marker.evaluate(environment)
    }


def test_the_wheel_holds_the_three_apps_and_nothing_else(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = email.message_from_string(
            archive.read(next(name for name in names if name.endswith(".dist-info/METADATA"))).decode()
        )
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"tenants", "metering", "quotas"}
    for needed in (
        "tenants/py.typed",
        "metering/py.typed",
        "quotas/py.typed",
        "metering/migrations/0001_initial.py",
        "quotas/migrations/0001_initial.py",
        "tenants/migrations/0001_initial.py",
        "quotas/lua/decide.lua",
        "metering/lua/log_append.lua",
    ):
        assert needed in names, needed
    assert any(name.startswith("quotas/templates/") for name in names)
    assert not any("/tests/" in name or name.startswith(("project/", "tests/", "bench/")) for name in names)
    runtime = _runtime_names(_requirements(metadata))
    assert runtime == RUNTIME
    assert not runtime & NOT_AT_RUNTIME


def _closure(requirements: list[Requirement], extras: tuple[str, ...]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions the wheel (with ``extras``) needs at run time, with their own requirements."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [(req, "") for req in requirements if req.marker is None or req.marker.evaluate(_marker_env(""))]
    todo += [(req, extra) for req in requirements for extra in extras if req.marker and "extra" in str(req.marker)]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate(_marker_env(extra)):
            continue
        name = canonicalize_name(req.name)
        wanted_extras = set(req.extras)
        if name in found and not wanted_extras:
            continue
        distribution = importlib.metadata.distribution(name)
        found[name] = distribution
        for line in distribution.requires or []:
            child = Requirement(line)
            if child.marker is None or child.marker.evaluate(_marker_env("")):
                todo.append((child, ""))
            else:
                todo.extend((child, wanted) for wanted in wanted_extras if child.marker.evaluate(_marker_env(wanted)))
    return found


def _link_dependencies(requirements: list[Requirement], target: Path, extras: tuple[str, ...]) -> set[str]:
    target.mkdir()
    for distribution in _closure(requirements, extras).values():
        base = Path(str(distribution.locate_file("")))
        for top in {Path(str(file)).parts[0] for file in distribution.files or []}:
            if top in {"..", "__pycache__"} or top.endswith(".pth"):
                continue
            source, link = base / top, target / top
            if source.exists() and not link.exists():
                link.symlink_to(source)
    return {path.name for path in target.iterdir()}


@pytest.fixture(scope="module")
def host(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A fresh virtualenv with the wheel and its runtime dependencies, and a fresh startproject configured with the
    README's install section exactly as written."""
    base = tmp_path_factory.mktemp("host")
    venv = base / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=base)
    python = venv / "bin" / "python"
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=base)
    with zipfile.ZipFile(wheel) as archive:
        metadata = email.message_from_string(
            archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        )
    # The install the docs give: the wheel with the `swagger` extra (docs/api.md serves Swagger UI locally).
    linked = _link_dependencies(_requirements(metadata), base / "deps", extras=("swagger",))
    assert "pytest_django" not in linked and "dj_database_url" not in linked
    site_packages = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=base).strip()
    )
    (site_packages / "_xaas_test_deps.pth").write_text(str(base / "deps") + "\n")

    env = {key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "PYTHON"))}
    env.pop("VIRTUAL_ENV", None)
    for name in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL"):
        env.pop(name, None)
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    site = base / "site"
    site.mkdir()
    _run(python, "-m", "django", "startproject", "hostsite", site, cwd=base, env=env)
    # The docs' settings and urls snippets, as written, in the order of the docs (tests/doc_snippets.py).
    settings_file = site / "hostsite" / "settings.py"
    settings_file.write_text(
        settings_file.read_text() + "".join(f"\n# {s.file}:{s.line}\n{s.code}" for s in run_by("host-settings"))
    )
    urls_file = site / "hostsite" / "urls.py"
    urls_file.write_text(
        urls_file.read_text() + "".join(f"\n# {s.file}:{s.line}\n{s.code}" for s in run_by("host-urls"))
    )
    (site / "hostsite" / "views.py").write_text(
        "from django.http import JsonResponse\n"
        "from quotas import enforce_quota\n\n\n"
        '@enforce_quota("api_calls")\n'
        "def search(request):\n"
        '    return JsonResponse({"results": []})\n'
    )
    urls = site / "hostsite" / "urls.py"
    urls.write_text(
        urls.read_text().replace("from django.urls import path", "from django.urls import path\n\nfrom . import views")
        + 'urlpatterns.append(path("search", views.search))\n'
    )
    _run(python, "manage.py", "migrate", "-v", "0", cwd=site, env=env)
    return site, env


def test_a_fresh_startproject_with_the_readme_install_answers_429(host: tuple[Path, dict[str, str]]):
    site, env = host
    python = site.parent / "venv" / "bin" / "python"
    _run(python, "manage.py", "tenant", "add", "acme", cwd=site, env=env)
    _run(python, "manage.py", "tenant", "add", "acme-key", "--parent", "acme", cwd=site, env=env)
    _run(python, "manage.py", "quota", "set", "acme", "api_calls", "2", "--period", "day", cwd=site, env=env)
    created = _run(python, "manage.py", "apikey", "create", "acme-key", cwd=site, env=env)
    key = re.search(r"\bxk_\w+", created)
    assert key is not None, created
    script = (
        "from django.test import Client\n"
        "client = Client(HTTP_HOST='localhost')\n"
        f"codes = [client.get('/search', headers={{'Authorization': 'Bearer {key.group(0)}'}}).status_code"
        " for _ in range(3)]\n"
        "print(codes)\n"
    )
    shell = _run(python, "manage.py", "shell", "-v", "0", "-c", script, cwd=site, env=env)
    assert shell.strip().splitlines()[-1] == "[200, 200, 429]"
    # The API and its docs as docs/api.md mounts them (Swagger UI's assets from the sidecar, served locally).
    pages = (
        "from django.test import Client\n"
        "client = Client(HTTP_HOST='localhost')\n"
        "print([client.get(path).status_code for path in ('/api/schema/', '/api/docs/', '/api/v1/usage')])\n"
    )
    shell = _run(python, "manage.py", "shell", "-v", "0", "-c", pages, cwd=site, env=env)
    assert shell.strip().splitlines()[-1] == "[200, 200, 401]"
    # The example project and the test tools are not in the host's environment.
    probe = "import importlib.util as u; print([u.find_spec(m) is None for m in ('project', 'pytest_django')])"
    assert _run(python, "-c", probe, cwd=site.parent, env=env).strip() == "[True, True]"
    site_packages = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=site, env=env).strip()
    )
    assert not (site_packages / "var").exists()


def test_the_host_project_is_check_deploy_clean(host: tuple[Path, dict[str, str]]):
    site, env = host
    python = site.parent / "venv" / "bin" / "python"
    (site / "hostsite" / "deploy.py").write_text(
        "from .settings import *  # noqa\n"
        "DEBUG = False\n"
        "SECRET_KEY = 'q' * 10 + 'w8e2r5t7y1u3i9o4p6a0s2d4f6g8h0j2k4l6z8x0c2v4b6n8m0'\n"
        "ALLOWED_HOSTS = ['example.com']\n"
        "SECURE_HSTS_SECONDS = 31536000\n"
        "SECURE_HSTS_INCLUDE_SUBDOMAINS = True\n"
        "SECURE_HSTS_PRELOAD = True\n"
        "SECURE_SSL_REDIRECT = True\n"
        "SESSION_COOKIE_SECURE = True\n"
        "CSRF_COOKIE_SECURE = True\n"
    )
    out = _run(
        python,
        "manage.py",
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        "--settings",
        "hostsite.deploy",
        cwd=site,
        env=env,
    )
    assert "no issues" in out
