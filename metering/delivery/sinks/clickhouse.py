"""The ClickHouse sink: every fact, with its lineage, inserted in large batches over ClickHouse's HTTP interface.

    METERING = {
        "ADAPTER": "metering.adapters.clickhouse.ClickHouseMeteringAdapter",
        "CLICKHOUSE_URL": "http://clickhouse.internal:8123",
        "CLICKHOUSE_DATABASE": "metering",
        "CLICKHOUSE_TABLE": "usage_facts",
        "CLICKHOUSE_USER": "metering",
        "CLICKHOUSE_PASSWORD": "...",
        "CLICKHOUSE_BATCH_SIZE": 10_000,
    }

One request per batch: ``POST /?query=INSERT INTO db.table FORMAT JSONEachRow`` with one JSON object a line, the
credentials in ``X-ClickHouse-User``/``X-ClickHouse-Key`` (never in the URL, which servers and proxies log). Only
what ClickHouse 18.16 (Debian's) has is used: ``DateTime`` (seconds, plus a ``microsecond`` column), ``Int64``
units, the exact quantity as a ``String`` (18.16 reads a Decimal in JSON only as a number, which a float parser may
round), ``Array(String)``, ``ReplacingMergeTree`` and ``FINAL``.

Exactly once in effect: the table is a ``ReplacingMergeTree`` whose sorting key holds the fact's identity
(``tenant_id``, ``transaction_id``) and its immutable ``feature`` and ``timestamp``; a resent row is identical to
the first one and lands in the same monthly partition, so merges keep one and every ``FINAL`` query counts one.
A batch whose answer was lost (a cut connection, a 5xx after the insert, a worker killed before it marked the
rows) is sent again as it is. See docs/clickhouse.md.
"""

from __future__ import annotations

import json
import re
from datetime import UTC
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
from django.core.checks import CheckMessage, Error, Warning
from django.utils.crypto import salted_hmac

from tenants.models import Tenant

from ...conf import metering_settings
from ...events import units_to_quantity
from ..outbox import ClaimedFact
from .base import BLOCKING_STATUSES, Outcome, SendResult, Sink, SinkNotConfigured, redact_url

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
CODE = re.compile(r"Code: (\d+)")
# ClickHouse error codes (ErrorCodes.cpp) that mean the rows themselves cannot be stored: retrying cannot help,
# bisection isolates the culprit. 6 CANNOT_PARSE_TEXT, 26 CANNOT_PARSE_QUOTED_STRING, 27 CANNOT_PARSE_INPUT_ASSERTION
# _FAILED, 38 CANNOT_PARSE_DATE, 41 CANNOT_PARSE_DATETIME, 53 TYPE_MISMATCH, 69 ARGUMENT_OUT_OF_BOUND, 70
# CANNOT_CONVERT_TYPE, 72 CANNOT_PARSE_NUMBER, 117 INCORRECT_DATA, 131 TOO_LARGE_STRING_SIZE.
CONTENT_CODES = frozenset({6, 26, 27, 38, 41, 53, 69, 70, 72, 117, 131})
# The configuration is wrong: 60 UNKNOWN_TABLE, 81 UNKNOWN_DATABASE, 16 NO_SUCH_COLUMN_IN_TABLE (schema not
# migrated), 192 UNKNOWN_USER, 193 WRONG_PASSWORD, 194 REQUIRED_PASSWORD, 195 IP_ADDRESS_NOT_ALLOWED, 164 READONLY,
# 497 ACCESS_DENIED, 516 AUTHENTICATION_FAILED.
BLOCKING_CODES = frozenset({16, 60, 81, 164, 192, 193, 194, 195, 497, 516})

COLUMNS: tuple[tuple[str, str], ...] = (
    ("tenant_id", "String"),
    ("feature", "String"),
    ("timestamp", "DateTime('UTC')"),
    ("microsecond", "UInt32"),
    ("transaction_id", "String"),
    ("units", "Int64"),
    ("quantity", "String"),
    ("lineage", "Array(String)"),
    ("metadata", "String"),
)
ENGINE = (
    "ReplacingMergeTree() PARTITION BY toYYYYMM(timestamp) ORDER BY (tenant_id, feature, timestamp, transaction_id)"
)


def identifier(setting: str) -> str:
    value = getattr(metering_settings, setting)
    if not isinstance(value, str) or not IDENTIFIER.match(value):
        raise SinkNotConfigured(f"METERING[{setting!r}] must be a ClickHouse identifier ([A-Za-z_][A-Za-z0-9_]*)")
    return value


def table_name() -> str:
    """``database.table`` from the settings (both checked identifiers: they are spliced into SQL)."""
    return f"{identifier('CLICKHOUSE_DATABASE')}.{identifier('CLICKHOUSE_TABLE')}"


class ClickHouseSink(Sink):
    name = "clickhouse"
    secret_setting = "CLICKHOUSE_PASSWORD"  # noqa: S105 (a setting's name)
    url_setting = "CLICKHOUSE_URL"
    secret_required: ClassVar[bool] = False  # a server may let a user in without a password (its own choice)

    def __init__(self) -> None:
        self._lineages: dict[str, list[str]] = {}

    # --- settings ---------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        url = metering_settings.CLICKHOUSE_URL
        if not url:
            raise SinkNotConfigured("METERING['CLICKHOUSE_URL'] is not set: the clickhouse sink has nowhere to deliver")
        return str(url)

    @property
    def secret(self) -> str:
        return str(metering_settings.CLICKHOUSE_PASSWORD or "")

    @property
    def user(self) -> str:
        return str(metering_settings.CLICKHOUSE_USER or "default")

    @property
    def batch_size(self) -> int:
        return int(metering_settings.CLICKHOUSE_BATCH_SIZE)

    def configuration_error(self) -> str | None:
        try:
            self.url  # noqa: B018 (raises when missing)
            table_name()
        except SinkNotConfigured as error:
            return str(error)
        return None

    def fingerprint(self) -> str:
        material = "\0".join([self.name, self.url_or_empty(), self.user, self.secret, self._table_or_empty()])
        return salted_hmac("metering.sinks.fingerprint", material, algorithm="sha256").hexdigest()[:32]

    def secret_values(self) -> list[str]:
        values = {self.secret} if self.secret else set()
        parts = urlsplit(self.url_or_empty())
        values.update(value for value in (parts.password,) if value)
        return sorted(values)

    def safe_url(self) -> str:
        return redact_url(self.url_or_empty())

    def url_or_empty(self) -> str:
        return str(metering_settings.CLICKHOUSE_URL or "")

    def _table_or_empty(self) -> str:
        try:
            return table_name()
        except SinkNotConfigured:
            return ""

    @classmethod
    def system_checks(cls) -> list[CheckMessage]:
        messages: list[CheckMessage] = []
        url = metering_settings.CLICKHOUSE_URL
        if not url:
            messages.append(
                Error("METERING['CLICKHOUSE_URL'] is required by the clickhouse sink.", id="xaas_metering.E060")
            )
        elif not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            messages.append(
                Error(f"METERING['CLICKHOUSE_URL'] must be an http(s) URL, got {url!r}.", id="xaas_metering.E061")
            )
        elif urlsplit(url).password:
            messages.append(
                Warning(
                    "METERING['CLICKHOUSE_URL'] carries a password: set CLICKHOUSE_USER/CLICKHOUSE_PASSWORD instead.",
                    id="xaas_metering.W060",
                )
            )
        for setting in ("CLICKHOUSE_DATABASE", "CLICKHOUSE_TABLE"):
            try:
                identifier(setting)
            except SinkNotConfigured as error:
                messages.append(Error(str(error) + ".", id="xaas_metering.E062"))
        for setting in ("CLICKHOUSE_USER", "CLICKHOUSE_PASSWORD"):
            value = getattr(metering_settings, setting)
            if value is not None and not isinstance(value, str):
                messages.append(Error(f"METERING[{setting!r}] must be a string.", id="xaas_metering.E063"))
        size = metering_settings.CLICKHOUSE_BATCH_SIZE
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 1_000_000:
            # One insert is one block (max_insert_block_size is 1,048,576 rows): atomic, and one part per month.
            messages.append(
                Error(
                    f"METERING['CLICKHOUSE_BATCH_SIZE'] must be an integer from 1 to 1,000,000, got {size!r}.",
                    id="xaas_metering.E064",
                )
            )
        return messages

    # --- rows -------------------------------------------------------------------------------------------------

    def prepare(self, facts: list[ClaimedFact]) -> None:
        """Resolve the lineage (tenant ids, root to leaf) of every path in the batch in one query."""
        missing = {fact.tenant_path for fact in facts} - set(self._lineages)
        if not missing:
            return
        chains = {path: [int(part) for part in path.strip("/").split("/") if part] for path in missing}
        pks = {pk for chain in chains.values() for pk in chain}
        names = dict(
            Tenant.objects.using(str(metering_settings.DATABASE_ALIAS))
            .filter(pk__in=pks)
            .values_list("pk", "external_id")
        )
        for path, chain in chains.items():
            self._lineages[path] = [names.get(pk, str(pk)) for pk in chain]

    def build(self, fact: ClaimedFact) -> dict[str, Any]:
        if fact.tenant_path not in self._lineages:
            self.prepare([fact])
        moment = fact.timestamp.astimezone(UTC)
        return {
            "tenant_id": fact.tenant_id,
            "feature": fact.feature,
            "timestamp": moment.strftime("%Y-%m-%d %H:%M:%S"),
            "microsecond": moment.microsecond,
            "transaction_id": fact.transaction_id,
            "units": fact.units,
            "quantity": str(units_to_quantity(fact.units)),
            "lineage": self._lineages[fact.tenant_path],
            "metadata": json.dumps(fact.metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
        }

    # --- sending ----------------------------------------------------------------------------------------------

    def headers(self) -> dict[str, str]:
        headers = {"X-ClickHouse-User": self.user}
        if self.secret:
            headers["X-ClickHouse-Key"] = self.secret
        return headers

    def send(self, events: list[dict[str, Any]]) -> SendResult:
        body = b"".join(
            json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode() + b"\n"
            for event in events
        )
        url, auth = self.endpoint("/")
        query = f"INSERT INTO {table_name()} FORMAT JSONEachRow"
        response = self.post(
            str(httpx.URL(url, params={"query": query})),
            body,
            {"Content-Type": "application/x-ndjson", **self.headers()},
            auth,
        )
        if isinstance(response, SendResult):
            return response
        if response.status_code == 200:
            return SendResult(Outcome.OK, 200)
        match = CODE.search(response.text[:200])
        code = int(match.group(1)) if match else None
        error = f"{response.status_code} {self.excerpt(response)}"
        if code in BLOCKING_CODES or response.status_code in BLOCKING_STATUSES:
            return SendResult(Outcome.BLOCKED, response.status_code, error)
        if code in CONTENT_CODES:
            return SendResult(Outcome.REJECTED, response.status_code, error)
        common = self.classify_status(response)
        if common is not None:
            return common
        return SendResult(Outcome.TRANSIENT, response.status_code, error)

    # --- reading (schema, reconciliation) ---------------------------------------------------------------------

    def query(self, sql: str, body: bytes | None = None) -> str:
        """Run one statement; ``ClickHouseError`` with the server's (redacted) message when it fails."""
        url, auth = self.endpoint("/")
        content = sql.encode() if body is None else body
        target = url if body is None else str(httpx.URL(url, params={"query": sql}))
        response = self.post(target, content, self.headers(), auth)
        if isinstance(response, SendResult):
            raise ClickHouseError(self.redact(response.error))
        if response.status_code != 200:
            raise ClickHouseError(f"{response.status_code} {self.excerpt(response)}")
        return response.text


class ClickHouseError(SinkNotConfigured):
    """ClickHouse refused a statement or could not be reached."""


def create_table_sql(table: str) -> str:
    columns = ",\n    ".join(f"{name} {kind}" for name, kind in COLUMNS)
    return f"CREATE TABLE IF NOT EXISTS {table} (\n    {columns}\n) ENGINE = {ENGINE}"


def ensure_schema(sink: ClickHouseSink | None = None) -> list[str]:
    """Create the database and table, or add the columns an older table lacks. Idempotent; returns what it did."""
    sink = sink or ClickHouseSink()
    database, name, table = identifier("CLICKHOUSE_DATABASE"), identifier("CLICKHOUSE_TABLE"), table_name()
    # Identifiers only (checked against IDENTIFIER above): nothing user-supplied reaches these statements.
    where = f"database = '{database}' AND name = '{name}'"
    done: list[str] = []
    sink.query(f"CREATE DATABASE IF NOT EXISTS {database}")
    if sink.query(f"SELECT count() FROM system.tables WHERE {where}").strip() == "0":  # noqa: S608
        sink.query(create_table_sql(table))
        return [f"created {table}"]
    engine = sink.query(f"SELECT engine FROM system.tables WHERE {where}").strip()  # noqa: S608
    if engine != "ReplacingMergeTree":
        raise ClickHouseError(
            f"{table} exists with engine {engine}, not ReplacingMergeTree: resent batches would count twice; "
            "rename it away and run clickhouse_schema again"
        )
    listing = sink.query(
        f"SELECT name, type FROM system.columns WHERE database = '{database}' AND table = '{name}' FORMAT TSV"  # noqa: S608
    )
    present = {line.split("\t")[0] for line in listing.splitlines() if line}
    for column, kind in COLUMNS:
        if column not in present:
            sink.query(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            done.append(f"added column {column} {kind}")
    return done
