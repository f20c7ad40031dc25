"""The code blocks of README.md and docs/*.md, and how each one is run by the suite (docs that run as written).

Every ``python`` and ``sh`` block must be listed in ``HOW`` under its key (``file:first line``); a block nobody runs
fails ``tests/integration/test_docs.py``. ``json`` and untagged blocks are sample answers, not code to run.

Runners:
- ``host-settings`` / ``host-urls``: appended, as written and in the order of the docs, to the ``settings.py`` /
  ``urls.py`` of a fresh ``django-admin startproject`` that has only the built wheel (tests/integration/test_wheel.py);
- ``python``: executed in-process (top-level ``await`` allowed) after the block's prelude in test_docs.py, which
  defines only what the block says is the reader's own (their model, their request);
- ``settings``: executed into a settings namespace, then checked by the system checks with those settings;
- ``commands``: each ``python manage.py ...`` line run in order (``[optional]`` parts included, placeholders
  filled), ``curl``: run against a live example site seeded by ``seed_demo``;
- ``not run``: with the reason (the README's own ``make`` commands are what CI runs; benchmarks never run in
  the suite).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^```", re.M | re.S)
KEY_CHARS = 60  # of a block's first line: enough to tell the blocks apart
BENCH = "not run: a benchmark (bench/ never runs in the suite; its README has the figures)"


@dataclass(frozen=True)
class Snippet:
    file: str
    line: int
    lang: str
    code: str

    @property
    def key(self) -> str:
        first = next((line.strip() for line in self.code.splitlines() if line.strip()), "")
        return f"{self.file}:{first[:KEY_CHARS].rstrip()}"


HOW: dict[str, str] = {
    "README.md:make run    # creates .venv, installs, migrates, seeds a dem": (
        "not run: the README's two commands (`.ci/run` runs `make test`; `make run`'s seed and pages are tested)"
    ),
    'README.md:curl -X POST http://127.0.0.1:8000/demo/completions -H "Auth': "curl",
    "README.md:pip install django-xaas-metering   # the three apps (tenants": (
        "not run: test_wheel installs the wheel it builds (offline), as this line installs the published one"
    ),
    "README.md:INSTALLED_APPS += [": "host-settings",
    'README.md:CACHES["default"].setdefault("OPTIONS", {}).update(': "settings",
    "README.md:from quotas.schedule import beat_schedule": "host-settings",
    "README.md:from datetime import UTC, datetime": "python",
    "README.md:from django.utils.decorators import method_decorator": "python",
    "README.md:python manage.py tenant add acme --kind organization": "commands",
    "README.md:from metering.features import Aggregation, define, spec": "python",
    "README.md:from metering import InvalidBatch, UsageEvent, get_meter": "python",
    "README.md:python manage.py usage_import usage.jsonl                 #": "commands",
    "docs/api.md:# settings.py": "host-settings",
    "docs/api.md:# urls.py": "host-urls",
    'docs/api.md:python manage.py apikey create acme-chat --name "billing wor': "commands",
    'docs/api.md:curl -X POST http://127.0.0.1:8000/demo/completions -H "Auth': "curl",
    "docs/lago.md:METERING = {": "settings",
    "docs/clickhouse.md:# settings.py: ClickHouse as the sink": "settings",
    "docs/clickhouse.md:# settings.py: Lago and ClickHouse side by side": "settings",
    "docs/lago.md:# myproject/metering_sink.py": "python",
    "docs/lago.md:# the collector's view (your side of the webhook)": "python",
}


def snippets(langs: tuple[str, ...] = ("python", "sh")) -> list[Snippet]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            if match.group("lang") in langs:
                line = text.count("\n", 0, match.start()) + 1
                found.append(Snippet(str(path.relative_to(ROOT)), line, match.group("lang"), match.group("code")))
    return found


def how(snippet: Snippet) -> str | None:
    """How the suite runs ``snippet`` (``HOW``); a shell block that runs ``bench/`` is a benchmark."""
    if snippet.lang == "sh" and re.search(r"(^|\s)(\.venv/bin/)?python bench/\w+\.py", snippet.code):
        return BENCH
    return HOW.get(snippet.key)


def run_by(runner: str) -> list[Snippet]:
    """The snippets ``runner`` runs, in the order of the docs (README first)."""
    return [snippet for snippet in snippets() if how(snippet) == runner]
