"""Docs that run as written: every ``python`` and ``sh`` block of README.md and docs/*.md is run here (or by
test_wheel.py in a fresh host project), or says why not (tests/doc_snippets.py)."""

from __future__ import annotations

import ast
import asyncio
import io
import re
import shlex
import subprocess
import sys
import types
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.checks import run_checks
from django.core.management import call_command
from django.test import RequestFactory, override_settings

from tests.doc_snippets import BENCH, HOW, Snippet, how, run_by, snippets
from tests.factories import tree

PROMPT_TOKENS = 3
pytest_plugins = ["tests.lago_fixtures"]


def test_every_snippet_is_run_or_says_why():
    listed = [snippet for snippet in snippets() if how(snippet) != BENCH]
    keys = [snippet.key for snippet in listed]
    unlisted = [f"{s.file}:{s.line}: {s.key!r}" for s in listed if s.key not in HOW]
    assert unlisted == [], "add each new code block to tests/doc_snippets.HOW (how the suite runs it)"
    assert sorted(set(HOW) - set(keys)) == [], "HOW names a block the docs no longer have"
    assert len(keys) == len(set(keys)), "two blocks start with the same line: make the first lines differ"
    assert len([s for s in snippets() if how(s) == BENCH]) >= 1  # the benchmark rule still matches something
    for runner in set(HOW.values()):
        assert runner in {"host-settings", "host-urls", "python", "settings", "commands", "curl"} or (
            runner.startswith("not run: ") and len(runner) > 20
        ), runner


def _run_code(code: str, namespace: dict[str, Any]) -> None:
    """Execute a snippet as a module body; top-level ``await`` allowed (as in an async REPL or a notebook)."""
    compiled = compile(code, "<snippet>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(compiled, namespace)  # noqa: S307 - the project's own docs
    if asyncio.iscoroutine(result):
        asyncio.run(result)


def _by_key(key_start: str) -> Snippet:
    (found,) = [snippet for snippet in snippets() if snippet.key.startswith(key_start)]
    return found


# ---- python blocks, each with a prelude of what it leaves to the reader ----


def _recording(namespace: dict[str, Any]) -> Callable[[], None]:
    async def call_the_model(prompt: str) -> tuple[str, int]:
        return prompt, len(prompt.split())

    namespace["call_the_model"] = call_the_model

    def after() -> None:
        from metering.events import UNITS_PER_ONE
        from metering.models import UsageRecord

        # async_to_sync, as a sync caller would: the ORM calls run on this thread's connection (asyncio.run would
        # open one in a worker thread that nobody closes).
        assert async_to_sync(namespace["in_async_code"])() == PROMPT_TOKENS
        assert namespace["in_sync_code"]() == PROMPT_TOKENS + 120
        recorded = sorted(UsageRecord.objects.values_list("units", flat=True))
        assert recorded == [PROMPT_TOKENS * UNITS_PER_ONE, 120 * UNITS_PER_ONE]

    return after


def _enforcing(namespace: dict[str, Any]) -> Callable[[], None]:
    from tenants.lineage import get_context

    request = RequestFactory().get("/search")
    request.tenant = get_context("acme-chat-key-1")  # type: ignore[attr-defined]  # what TenantMiddleware sets from the request's API key
    namespace.update(request=request, estimate=200, actual=150)

    def after() -> None:
        from metering.usage import get_usage

        assert get_usage("acme", "llm_tokens", None, None) == 120 + 150
        search, view = namespace["search"], namespace["SearchView"]
        assert callable(search) and hasattr(view, "as_view")

    return after


def _custom_sink(namespace: dict[str, Any]) -> Callable[[], None]:
    module = types.ModuleType("myproject.metering_sink")
    package = types.ModuleType("myproject")
    package.metering_sink = module  # type: ignore[attr-defined]
    sys.modules.update({"myproject": package, "myproject.metering_sink": module})
    namespace.update(__name__="myproject.metering_sink")

    def after() -> None:
        from metering.delivery.sinks.base import configured_sink_class

        module.__dict__.update(namespace)
        try:
            with override_settings(METERING=namespace["METERING"]):
                sink_class = configured_sink_class()
                assert sink_class is namespace["KafkaSink"] and sink_class.name == "kafka"
                errors = [m.id for m in run_checks() if m.level >= 40 and (m.id or "").startswith("xaas_")]
                assert errors == []
        finally:
            del sys.modules["myproject.metering_sink"], sys.modules["myproject"]

    return after


def _webhook_receiver(namespace: dict[str, Any]) -> Callable[[], None]:
    def after() -> None:
        from metering.delivery.sinks.webhook import signature

        body = b'{"events": []}'
        secret = "the WEBHOOK_SECRET"
        signed = RequestFactory().post(
            "/usage", body, content_type="application/json", headers={"X-Metering-Signature": signature(secret, body)}
        )
        forged = RequestFactory().post(
            "/usage", body, content_type="application/json", headers={"X-Metering-Signature": "sha256=00"}
        )
        receive = namespace["receive_usage"]
        assert receive(signed).status_code == 204  # the product's own signature verifies
        assert receive(forged).status_code == 401

    return after


def _batch(namespace: dict[str, Any]) -> Callable[[], None]:
    def after() -> None:
        from metering.models import UsageRecord

        assert list(namespace["result"].created) == [0] and namespace["result"].duplicates == (1,)
        assert UsageRecord.objects.count() == 1  # the invalid batch stored nothing

    return after


def _features(namespace: dict[str, Any]) -> Callable[[], None]:
    def after() -> None:
        from metering.models import FeatureDefinition

        assert set(FeatureDefinition.objects.values_list("name", "aggregation")) == {
            ("storage_bytes", "latest"),
            ("seats", "unique_count"),
        }

    return after


PRELUDES: dict[str, Callable[[dict[str, Any]], Callable[[], None]]] = {
    "README.md:from metering.features import Aggregation, define, spec": _features,
    "README.md:from metering import InvalidBatch, UsageEvent, get_meter": _batch,
    "README.md:from datetime import UTC, datetime": _recording,
    "README.md:from django.utils.decorators import method_decorator": _enforcing,
    "docs/lago.md:# myproject/metering_sink.py": _custom_sink,
    "docs/lago.md:# the collector's view (your side of the webhook)": _webhook_receiver,
}


@pytest.mark.parametrize("snippet", run_by("python"), ids=lambda snippet: f"{snippet.file}:{snippet.line}")
@pytest.mark.django_db(transaction=True)
def test_python_snippets_run_as_written(snippet: Snippet):
    tree({"acme": None, "acme-chat": "acme", "acme-chat-key-1": "acme-chat"})
    namespace: dict[str, Any] = {"__name__": "snippet"}
    after = PRELUDES[snippet.key](namespace)
    _run_code(snippet.code, namespace)
    after()


# ---- settings blocks ----


def test_the_cache_settings_snippet_gives_timeouts_and_the_breaker(settings: Any):
    namespace: dict[str, Any] = {
        "CACHES": {"default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": "redis://127.0.0.1:6379/0"}}
    }
    _run_code(_by_key('README.md:CACHES["default"]').code, namespace)
    settings.CACHES = {**settings.CACHES, "default": namespace["CACHES"]["default"]}
    ids = {message.id for message in run_checks()}
    assert not ids & {"xaas_metering.W020", "xaas_metering.W021"}  # the checks that ask for exactly this


@pytest.mark.parametrize(
    "snippet",
    [s for s in run_by("settings") if "METERING = {" in s.code],
    ids=lambda snippet: f"{snippet.file}:{snippet.line}",
)
def test_metering_settings_snippets_pass_the_checks(settings: Any, snippet: Snippet):
    namespace: dict[str, Any] = {}
    _run_code(snippet.code, namespace)
    settings.METERING = namespace["METERING"]
    errors = [
        f"{message.id}: {message.msg}"
        for message in run_checks()
        if message.level >= 40 and (message.id or "").startswith("xaas")
    ]
    assert errors == []


def test_settings_snippets_are_all_tested():
    cache = 'README.md:CACHES["default"].setdefault("OPTIONS", {}).update('
    others = {snippet.key for snippet in run_by("settings") if "METERING = {" in snippet.code}
    assert {snippet.key for snippet in run_by("settings")} == {cache, *others}


# ---- command lines ----


def _command_lines(snippet: Snippet) -> list[list[str]]:
    lines = []
    for raw in snippet.code.splitlines():
        line = re.split(r"\s#", raw)[0].strip()  # a comment after the command
        if not line.startswith("python manage.py "):
            continue
        line = re.sub(r"\[([^\]]*)\]", r"\1", line)  # the optional parts too
        lines.append(shlex.split(line)[2:])
    return lines


IMPORT_LINES = [
    '{"tenant_id": "acme-chat-key-1", "feature_name": "llm_tokens", "quantity": 3, "transaction_id": "%s-1"}',
    '{"tenant_id": "acme-chat-key-1", "feature_name": "llm_tokens", "quantity": "2.5", "transaction_id": "%s-2",'
    ' "timestamp": "%s"}',
]


def _import_files(where: Path) -> None:
    """The files the import lines name, in the directory they run in."""
    now = datetime.now(UTC).isoformat()
    for name in ("usage.jsonl", "old.jsonl"):
        (where / name).write_text(
            "\n".join(line % (name, now) if '%s"}' in line else line % name for line in IMPORT_LINES) + "\n"
        )
    (where / "2024.jsonl").write_text(IMPORT_LINES[1] % ("2024", "2024-12-01T00:00:00+00:00") + "\n")
    (where / "usage.csv").write_text(
        "tenant_id,feature_name,quantity,transaction_id\nacme-chat-key-1,llm_tokens,4,csv-1\n"
    )


def _run_lines(snippet: Snippet, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    from django.core.management.base import CommandError

    from metering.counters import client

    outputs = {}
    for raw in snippet.code.splitlines():
        piped = raw.split("|", 1)[0].strip() if "| python manage.py" in raw else None
        for args in _command_lines(Snippet(snippet.file, snippet.line, snippet.lang, raw.split("| ", 1)[-1])):
            args = [{"N": "1", "DAYS": "60"}.get(arg, arg) for arg in args]  # placeholders
            out = io.StringIO()
            if piped:  # `producer | python manage.py ... -`: the producer's lines on stdin
                stream = io.TextIOWrapper(io.BytesIO((IMPORT_LINES[0] % "piped" + "\n").encode()))
                monkeypatch.setattr(sys, "stdin", stream)
            if args[0] == "metering_drain" and client() is None:
                with pytest.raises(CommandError, match="django-redis"):  # log mode needs Redis: the line says so
                    call_command(*args, stdout=out, stderr=io.StringIO())
                continue
            call_command(*args, stdout=out, stderr=io.StringIO())
            outputs[" ".join(args)] = out.getvalue()
    return outputs


@pytest.mark.django_db(transaction=True)
def test_the_command_line_reference_runs_as_written(
    settings: Any, tmp_path: Path, lago_settings: Any, monkeypatch: pytest.MonkeyPatch
):
    """Against the fake Lago (the reference has Lago's commands too), in a directory with the files it names."""
    settings.VAR_DIR = tmp_path
    monkeypatch.chdir(tmp_path)
    _import_files(tmp_path)
    (snippet,) = [s for s in run_by("commands") if s.key.startswith("README.md:python manage.py tenant add")]
    outputs = _run_lines(snippet, monkeypatch)
    assert "acme-chat-key-1 (key)" in outputs["tenant tree"]
    assert "1000000" in outputs["quota list acme-chat-key-1"].replace(",", "")
    from tenants.lineage import get_context

    assert get_context("acme-chat-key-1").lineage_ids == ("other-org", "acme-chat", "acme-chat-key-1")  # moved


@pytest.mark.django_db(transaction=True)
def test_the_import_lines_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from metering.models import UsageRecord

    tree({"acme": None, "acme-chat": "acme", "acme-chat-key-1": "acme-chat"})
    monkeypatch.chdir(tmp_path)
    _import_files(tmp_path)
    (snippet,) = [s for s in run_by("commands") if s.key.startswith("README.md:python manage.py usage_import")]
    _run_lines(snippet, monkeypatch)
    stored = set(UsageRecord.objects.values_list("transaction_id", flat=True))
    # usage.jsonl, usage.csv, stdin and 2024.jsonl (its backdate widened); old.jsonl only validated (--dry-run)
    assert stored == {"usage.jsonl-1", "usage.jsonl-2", "csv-1", "piped-1", "2024-2"}


@pytest.mark.django_db(transaction=True)
def test_the_api_key_commands_run_as_written():
    (snippet,) = [s for s in run_by("commands") if s.file == "docs/api.md"]
    tree({"acme": None, "acme-chat": "acme"})
    created = ""
    for args in _command_lines(snippet):
        if args[:2] == ["apikey", "revoke"]:
            prefix = re.search(r"\bxk_([a-z0-9]{8})", created)
            assert prefix is not None, created
            args = [*args[:2], prefix.group(1)]  # the doc's example prefix is the one just created
        out = io.StringIO()
        call_command(*args, stdout=out)
        created = created or out.getvalue()
    from tenants.models import ApiKey

    assert ApiKey.objects.get(name="billing worker").revoked_at is not None


# ---- curl against the example site ----


@pytest.mark.parametrize("snippet", run_by("curl"), ids=lambda snippet: f"{snippet.file}:{snippet.line}")
@pytest.mark.django_db(transaction=True)
def test_curl_snippets_reach_the_demo(snippet: Snippet, live_server: Any, settings: Any, tmp_path: Path):
    settings.VAR_DIR = tmp_path / "var"
    call_command("seed_demo", stdout=io.StringIO())
    command = snippet.code.replace("http://127.0.0.1:8000", live_server.url)
    done = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert '"text": "hello metered world"' in done.stdout.replace('"text":"', '"text": "'), done.stdout
