"""``manage.py usage_import``: JSON Lines and CSV, per-line rejects with line numbers, resumable, backdating."""

from __future__ import annotations

import io
import json
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from metering.importer import run_import
from metering.models import UsageRecord
from tests.factories import tree, usage

pytestmark = pytest.mark.django_db

ORG = {"org": None, "p1": "org", "k1": "p1", "k2": "p1", "other": None}
NOW = datetime.now(UTC).replace(microsecond=0)


def line(tenant_id: str = "k1", quantity: object = 1, transaction_id: str = "tx", **extra: object) -> str:
    return json.dumps({"tenant_id": tenant_id, "feature_name": "llm_tokens", "quantity": quantity,
                       "transaction_id": transaction_id, **extra})  # fmt: skip


def run(*args: str, stdin: bytes | None = None) -> tuple[dict, str]:
    out, err = io.StringIO(), io.StringIO()
    if stdin is not None:
        original = sys.stdin
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    try:
        try:
            call_command("usage_import", *args, "--json", stdout=out, stderr=err)
        except CommandError as error:
            return json.loads(out.getvalue()), str(error)
    finally:
        if stdin is not None:
            sys.stdin = original
    return json.loads(out.getvalue()), ""


def test_a_jsonl_file_is_imported_and_a_rerun_records_nothing_twice(tmp_path: Path):
    tree(ORG)
    path = tmp_path / "usage.jsonl"
    path.write_text("\n".join(line(f"k{1 + i % 2}", "0.5", f"tx-{i}") for i in range(5000)) + "\n")
    summary, error = run(str(path), "--batch-size", "700")
    assert error == ""
    assert (summary["imported"], summary["duplicates"], summary["rejected"]) == (5000, 0, 0)
    assert usage("org") == Decimal(2500)
    again, _ = run(str(path))
    assert (again["imported"], again["duplicates"]) == (0, 5000)
    assert UsageRecord.objects.count() == 5000
    assert usage("org") == Decimal(2500)


def test_an_import_rerun_after_a_crash_records_nothing_twice(tmp_path: Path):
    tree(ORG)
    data = ("\n".join(line("k1", 1, f"tx-{i}") for i in range(1000)) + "\n").encode()
    batches = []

    def crash(report):
        batches.append(report.imported)
        if len(batches) == 3:
            raise KeyboardInterrupt  # the process dies between two batches

    with pytest.raises(KeyboardInterrupt):
        run_import(io.BytesIO(data), "jsonl", batch_size=100, progress=crash)
    assert UsageRecord.objects.count() == 300
    report = run_import(io.BytesIO(data), "jsonl", batch_size=64)
    assert (report.imported, report.duplicates) == (700, 300)
    assert UsageRecord.objects.count() == 1000
    assert usage("org") == Decimal(1000)


def test_bad_lines_are_rejected_with_their_line_numbers_and_the_rest_is_imported(tmp_path: Path):
    tree(ORG)
    lines = [
        line("k1", 1, "a"),  # 1
        "not json",  # 2
        "",  # 3: blank, skipped
        line("nobody", 1, "b"),  # 4
        line("k1", "NaN", "c"),  # 5
        '{"tenant_id": "k1", "feature_name": "llm_tokens", "quantity": NaN, "transaction_id": "d"}',  # 6
        line("k1", 1, "e", colour="red"),  # 7
        line("k1", 1, "f\u0000"),  # 8
        line("k1", 1, "g", timestamp="2026-13-01T00:00:00Z"),  # 9
        "[1, 2]",  # 10
        line("k1", 1),  # 11 (transaction_id "tx")
        json.dumps({"tenant_id": "k1", "feature_name": "llm_tokens", "quantity": 1}),  # 12: no transaction id
    ]
    path = tmp_path / "usage.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"tenant_id": "k1", "x": "\xff"}\n')  # 13: not UTF-8
    summary, error = run(str(path), "--batch-size", "3")
    assert "rejected" in error
    rejected = {item["line"]: item["field"] for item in summary["rejects"]}
    assert rejected == {
        2: "line",
        4: "tenant_id",
        5: "quantity",
        6: "line",
        7: "colour",
        8: "transaction_id",
        9: "timestamp",
        10: "line",
        12: "transaction_id",
        13: "line",
    }
    assert (summary["imported"], summary["rejected"]) == (2, 10)
    assert sorted(UsageRecord.objects.values_list("transaction_id", flat=True)) == ["a", "tx"]


def test_csv_with_line_numbers_metadata_and_unix_seconds(tmp_path: Path):
    tree(ORG)
    stamp = int((NOW - timedelta(hours=2)).timestamp())
    rows = [
        "tenant_id,feature_name,quantity,transaction_id,timestamp,metadata",  # 1
        f'k1,llm_tokens,2.5,a,{stamp},"{{""model"": ""x""}}"',  # 2
        "k2,llm_tokens,1,b,,",  # 3
        'k2,llm_tokens,1,"multi\nline",,',  # 4-5: a quoted cell over two lines (an invalid transaction id)
        "k2,llm_tokens,1,c",  # 6: too few cells
        "k2,llm_tokens,1,d,,not json",  # 7
        "k2,llm_tokens,1,e\x00,,",  # 8: NUL
        "k1,llm_tokens,\u0661,f,,",  # 9: Arabic-Indic digit
    ]
    path = tmp_path / "usage.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    summary, error = run(str(path))
    assert error
    rejected = {item["line"]: item["field"] for item in summary["rejects"]}
    assert rejected == {5: "transaction_id", 6: "line", 7: "metadata", 8: "transaction_id", 9: "quantity"}
    assert summary["imported"] == 2
    fact = UsageRecord.objects.get(transaction_id="a")
    assert fact.metadata == {"model": "x"}
    assert fact.timestamp == datetime.fromtimestamp(stamp, UTC)
    assert usage("org") == Decimal("3.5")


def test_a_csv_header_with_an_unknown_column_is_refused(tmp_path: Path):
    tree(ORG)
    path = tmp_path / "usage.csv"
    path.write_text("tenant_id,feature_name,quantity,transaction_id,price\nk1,llm_tokens,1,a,3\n")
    summary, _ = run(str(path))
    assert summary["rejects"] == [{"line": 1, "field": "header", "message": "unknown column 'price'"}]
    assert UsageRecord.objects.count() == 0


def test_dry_run_validates_and_stores_nothing(tmp_path: Path):
    tree(ORG)
    path = tmp_path / "usage.jsonl"
    path.write_text(line("k1", 1, "a") + "\n" + line("k1", -1, "b") + "\n")
    summary, _ = run(str(path), "--dry-run")
    assert (summary["imported"], summary["rejected"], summary["dry_run"]) == (1, 1, True)
    assert UsageRecord.objects.count() == 0


def test_the_backdating_window_is_honoured_and_an_operator_may_widen_it(tmp_path: Path):
    tree(ORG)
    old = (NOW - timedelta(days=100)).isoformat()
    path = tmp_path / "usage.jsonl"
    path.write_text(line("k1", 1, "old", timestamp=old) + "\n" + line("k1", 1, "new") + "\n")
    summary, error = run(str(path))
    assert [(item["line"], item["field"]) for item in summary["rejects"]] == [(1, "timestamp")]
    summary, error = run(str(path), "--max-backdate", "400")
    assert error == ""
    assert (summary["imported"], summary["duplicates"]) == (1, 1)
    assert UsageRecord.objects.filter(transaction_id="old").exists()


def test_stdin_is_read_with_a_dash():
    tree(ORG)
    summary, _ = run("-", stdin=(line("k1", 3, "a") + "\n").encode())
    assert summary["imported"] == 1
    assert usage("org") == Decimal(3)


def test_the_progress_line_goes_to_stderr(tmp_path: Path):
    tree(ORG)
    path = tmp_path / "usage.jsonl"
    path.write_text(line("k1", 1, "a") + "\n")
    out, err = io.StringIO(), io.StringIO()
    call_command("usage_import", str(path), stdout=out, stderr=err)
    assert "1 imported, 0 duplicates, 0 rejected" in err.getvalue() and "events/s" in err.getvalue()
    assert "imported 1, duplicates 0, rejected 0" in out.getvalue()
