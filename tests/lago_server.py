"""Real HTTP servers on 127.0.0.1 for the delivery tests and the benchmark.

``FakeLago`` behaves like lago-api v1.51's events API (``../shared/notes/lago-events-api.md``; each behaviour and
the lago-api source it follows are listed on the class): Bearer auth (401 unknown key, 403 read-only key), batches
all-or-nothing, the PostgreSQL store's batch-wide ``transaction_id`` check or the ClickHouse store's replacing
dedup (``dedupe="clickhouse"``; a repeat under another code or timestamp is a second, billed event:
``double_billed()`` lists those), ``GET /api/v1/events/{transaction_id}``.

``FakeCollector`` is a webhook receiver: checks the HMAC signature over the raw body, stores each
``idempotency_key`` once.

Both can be told to misbehave, one scripted fault per request, in order (``fail(kind, times=..., ...)``):
``500``/``503`` (answer that status), ``429`` (rate limited, ``X-RateLimit-Reset`` and optionally ``Retry-After``),
``slow`` (wait ``delay`` seconds, then process: the client has usually given up, the batch is stored anyway),
``drop_before_store`` / ``drop_after_store`` (close the connection without an answer, before or after storing),
``echo`` (answer ``status`` with the request's headers in the body, as a debugging proxy would),
``hold_before_store`` / ``hold_after_store`` (signal ``held`` and wait for ``release()``, e.g. while a test kills
the worker that sent the request; ``hold_before_store`` then discards the request, as a lost connection would).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import socket
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, unquote

NUMERIC = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$")
DECIMAL_STRING = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")
FAULTS = {
    "500",
    "503",
    "429",
    "slow",
    "drop_before_store",
    "drop_after_store",
    "hold_before_store",
    "hold_after_store",
    "echo",
}


@dataclass
class Fault:
    kind: str
    retry_after: str | None = None
    reset: str | None = None
    delay: float = 0.0
    status: int = 500
    pad: int = 0


@dataclass
class Request:
    path: str
    status: int | None  # None: the connection was dropped without an answer
    keys: list[str] = field(default_factory=list)
    fault: str | None = None


class _Drop(Exception):
    """Close the connection without answering."""


class FakeServer:
    """Shared machinery: a threaded HTTP/1.1 server (keep-alive) on a random port, and the fault script."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._epoch = 0  # bumped by reset(): a slowed request of an earlier epoch never stores
        self.faults: deque[Fault] = deque()
        self.requests: list[Request] = []
        self.held = threading.Event()
        self._release = threading.Event()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> Self:
        return self.start_on(0)

    def start_on(self, port: int) -> Self:
        owner: FakeServer = self

        class Handler(_Handler):
            server_owner = owner

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_port}"

    # scripting

    def fail(self, kind: str, times: int = 1, **params: Any) -> None:
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; known: {sorted(FAULTS)}")
        with self.lock:
            for _ in range(times):
                self.faults.append(Fault(kind, **params))

    def release(self) -> None:
        self._release.set()

    def reset(self) -> None:
        with self.lock:
            # A request still held or slowed from before the reset (the previous test's) must not store into the
            # next test's empty store: it is dropped when it wakes up (see handle).
            self._epoch += 1
            self.faults.clear()
            self.requests.clear()
            self.held.clear()
            self._release.clear()
            self._reset_store()

    def _reset_store(self) -> None:
        raise NotImplementedError

    def _next_fault(self) -> Fault | None:
        with self.lock:
            return self.faults.popleft() if self.faults else None

    def _log(self, path: str, status: int | None, keys: list[str], fault: str | None) -> None:
        with self.lock:
            self.requests.append(Request(path, status, keys, fault))

    def sent_counts(self) -> Counter[str]:
        """How many requests carried each key (answered or not)."""
        with self.lock:
            return Counter(key for request in self.requests for key in request.keys)

    def _wait(self, seconds: float | None = None) -> None:
        if seconds is None:
            self._release.wait()
        else:
            self._stopping.wait(seconds)

    # per request (runs in the handler's thread)

    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], Any]:
        """Apply the next fault around ``process``. Returns (status, headers, JSON body); raises ``_Drop``."""
        epoch = self._epoch
        fault = self._next_fault() if method == "POST" else None
        kind = fault.kind if fault else None
        keys = self.keys_of(body)
        if fault is not None and kind in ("500", "503"):
            self._log(path, int(kind), keys, kind)
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return int(kind), extra, {"status": int(kind), "error": "Internal Server Error"}
        if fault is not None and kind == "429":
            self._log(path, 429, keys, kind)
            extra = {"X-RateLimit-Limit": "500", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": fault.reset or "1"}
            if fault.retry_after:
                extra["Retry-After"] = fault.retry_after
            return 429, extra, {"status": 429, "error": "Too Many Requests"}
        if fault is not None and kind == "echo":
            # A misconfigured collector or debugging proxy that echoes the request's headers in its error answer.
            self._log(path, fault.status, keys, kind)
            echoed = {name: value for name, value in headers.items()}
            return fault.status, {}, {"padding": "x" * fault.pad, "request_headers": echoed}
        if kind == "drop_before_store":
            self._log(path, None, keys, kind)
            raise _Drop
        if kind == "hold_before_store":
            self._log(path, None, keys, kind)
            self.held.set()
            self._wait()
            raise _Drop
        if fault is not None and kind == "slow":
            self._wait(fault.delay)
            if self._epoch != epoch:
                raise _Drop  # reset() while it waited: it belonged to a test that is over
        status, extra, payload = self.process(method, path, headers, body)
        if kind == "drop_after_store":
            self._log(path, None, keys, kind)
            raise _Drop
        if kind == "hold_after_store":
            self._log(path, None, keys, kind)
            self.held.set()
            self._wait()
            raise _Drop
        self._log(path, status, keys, kind)
        return status, extra, payload

    def keys_of(self, body: bytes) -> list[str]:
        raise NotImplementedError

    def process(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], Any]:
        raise NotImplementedError


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: Nagle + delayed ACK would add 40 ms each
    server_owner: FakeServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _serve(self, method: str) -> None:
        length = self.headers.get("Content-Length")
        if method == "POST" and length is None:
            self._answer(411, {}, {"status": 411, "error": "Length Required"})
            return
        body = self.rfile.read(int(length or 0))
        try:
            status, headers, payload = self.server_owner.handle(method, self.path, self.headers, body)
        except _Drop:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._answer(status, headers, payload)

    def _answer(self, status: int, headers: dict[str, str], payload: Any) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client is gone (e.g. killed while we held its request)
            self.close_connection = True

    def do_POST(self) -> None:
        self._serve("POST")

    def do_GET(self) -> None:
        self._serve("GET")

    def do_PUT(self) -> None:
        self._serve("PUT")


def _unprocessable(details: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    return (
        422,
        {},
        {"status": 422, "error": "Unprocessable Entity", "code": "validation_errors", "error_details": details},
    )


class FakeLago(FakeServer):
    """lago-api v1.51's events API, each behaviour after the lago-api source named beside it.

    - ``POST /api/v1/events/batch`` (``Api::V1::EventsController#batch`` -> ``Events::CreateBatchService``): strong
      params keep the known fields only (unknown ones are dropped, ``properties`` any JSON object); no ``events`` or
      an empty list -> 422 ``{"events": ["no_events"]}``; more than ``max_batch`` -> ``too_many_events``; each event
      validated (``Event`` model: ``transaction_id`` and ``code`` present; ``timestamp`` read as ``BigDecimal`` of
      its text, so integers, floats and decimal strings pass and anything else is ``invalid_format``); ``refuse_codes``
      stands for ``CalculateExpressionService`` failing: a *string* error at that index. All or nothing.
    - ``dedupe="postgres"`` (``bulk_insert_events``): ``insert_all`` on the unique index (organization,
      ``external_subscription_id``, ``transaction_id``), then each event looked up by ``transaction_id`` alone: a
      stored repeat, or a second event of the batch with the same ``transaction_id`` on *any* subscription (v1.39+),
      is ``{"transaction_id": ["value_already_exist"]}`` at its index and the whole batch is rolled back.
    - ``dedupe="clickhouse"`` (``events_raw`` ReplacingMergeTree, ordered by organization, code, subscription,
      timestamp date and timestamp, transaction id): a repeat with the same key replaces the event, 200.
    - ``GET /api/v1/events/{transaction_id}`` (``EventsController#show``: ``find_by`` organization and transaction id):
      200 ``{"event": ...}`` (the first stored) or 404 ``event_not_found``.
    - Any other route: 404 ``resource_not_found`` (``ApplicationController#not_found``).
    """

    def __init__(
        self,
        api_key: str = "lago-test-key",
        *,
        read_only_keys: tuple[str, ...] = (),
        max_batch: int = 100,
        dedupe: str = "postgres",
        refuse_codes: dict[str, str] | None = None,
        crash_on: str | None = None,
    ) -> None:
        super().__init__()
        if dedupe not in ("postgres", "clickhouse"):
            raise ValueError(dedupe)
        self.keys: dict[str, str] = {api_key: "write", **dict.fromkeys(read_only_keys, "read")}
        self.max_batch = max_batch
        self.dedupe = dedupe
        self.refuse_codes = dict(refuse_codes or {})
        self.crash_on = crash_on  # a batch holding an event with this property answers 500 (a poison event)
        # external_subscription_id -> the subscription GET /api/v1/subscriptions/{id} answers (``started_at``...)
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.customers: dict[str, dict[str, Any]] = {}
        self.billable_metrics: dict[str, dict[str, Any]] = {}
        self._reset_store()

    def _reset_store(self) -> None:
        # postgres: (external_subscription_id, transaction_id) -> event;
        # clickhouse: (code, external_subscription_id, timestamp, transaction_id) -> event
        self.store: dict[tuple[str, ...], dict[str, Any]] = {}
        self.writes: Counter[tuple[str, ...]] = Counter()

    # what tests read

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(event) for event in self.store.values()]

    def stored_transaction_ids(self) -> Counter[str]:
        """Stored events per transaction_id: every value is 1 when nothing was billed twice."""
        with self.lock:
            return Counter(event["transaction_id"] for event in self.store.values())

    def double_billed(self) -> list[str]:
        """transaction_ids stored under two identities (two subscriptions, or two codes/timestamps on ClickHouse)."""
        return sorted(tx for tx, count in self.stored_transaction_ids().items() if count > 1)

    def keys_of(self, body: bytes) -> list[str]:
        try:
            payload = json.loads(body)
            events = payload.get("events") if "events" in payload else [payload.get("event")]
            return [str(event.get("transaction_id")) for event in events if isinstance(event, dict)]
        except (ValueError, AttributeError, TypeError):
            return []

    # the API

    def process(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], Any]:
        route = path.split("?", 1)[0]
        if method == "GET" and route == "/_fake/stats":  # not Lago's: lets another process check the store
            with self.lock:
                stored = len(self.store)
            return 200, {}, {"stored": stored, "double_billed": self.double_billed()}
        single = method == "GET" and route.startswith("/api/v1/events/") and route.count("/") == 4
        listing = method == "GET" and route == "/api/v1/events"
        subscription = method == "GET" and route.startswith("/api/v1/subscriptions/") and route.count("/") == 4
        resource = self._resource(method, route)
        known = single or listing or subscription or resource is not None
        if not known and (method != "POST" or route not in ("/api/v1/events", "/api/v1/events/batch")):
            return 404, {}, {"status": 404, "error": "Not Found", "code": "resource_not_found"}
        authorization = headers.get("Authorization") or ""
        scheme, _, key = authorization.partition(" ")
        role = self.keys.get(key) if scheme == "Bearer" else None
        if role is None:
            return 401, {}, {"status": 401, "error": "Unauthorized"}
        if resource is not None:
            if method != "GET" and role != "write":
                return 403, {}, {"status": 403, "error": "Forbidden", "code": "write_permission_denied"}
            return self._manage(method, *resource, body)
        if single:
            return self._show(unquote(route.rsplit("/", 1)[1]))
        if listing:
            return self._index(parse_qs(path.partition("?")[2]))
        if subscription:
            found = self.subscriptions.get(unquote(route.rsplit("/", 1)[1]))
            if found is None:
                return 404, {}, {"status": 404, "error": "Not Found", "code": "subscription_not_found"}
            return 200, {}, {"subscription": dict(found)}
        if role != "write":
            return 403, {}, {"status": 403, "error": "Forbidden", "code": "write_permission_denied"}
        content_type = (headers.get("Content-Type") or "").split(";")[0].strip()
        try:
            payload = json.loads(body) if content_type == "application/json" else None
        except ValueError:
            payload = None
        if route.endswith("/batch"):  # the batch controller does not `require` its root
            events = payload.get("events") if isinstance(payload, dict) else None
            return self._batch(events)
        if not isinstance(payload, dict) or payload.get("event") in (None, "", {}):
            return 400, {}, {"status": 400, "error": "BadRequest: param is missing or the value is empty: event"}
        return self._single(payload["event"])

    def _show(self, transaction_id: str) -> tuple[int, dict[str, str], Any]:
        with self.lock:
            for event in self.store.values():
                if event["transaction_id"] == transaction_id:
                    return 200, {}, {"event": self._serialize(event)}
        return 404, {}, {"status": 404, "error": "Not Found", "code": "event_not_found"}

    # lago_sync's resources: customers, subscriptions, billable metrics (lago-api CustomersController,
    # SubscriptionsController, BillableMetricsController)
    RESOURCES = {"customers": ("customer", "external_id"), "billable_metrics": ("billable_metric", "code")}

    def _resource(self, method: str, route: str) -> tuple[str, str | None] | None:
        parts = route.split("/")
        if len(parts) < 4 or parts[:3] != ["", "api", "v1"] or len(parts) > 5:
            return None
        name, key = parts[3], (unquote(parts[4]) if len(parts) == 5 else None)
        if name == "subscriptions" and method == "POST" and key is None:
            return name, None
        if name not in self.RESOURCES:
            return None
        if (method == "GET" and key is not None) or (method == "POST" and key is None):
            return name, key
        if method == "PUT" and name == "billable_metrics" and key is not None:
            return name, key
        return None

    def _manage(self, method: str, name: str, key: str | None, body: bytes) -> tuple[int, dict[str, str], Any]:
        with self.lock:
            if name == "subscriptions":  # POST: create (an existing external_id is answered as it is)
                wanted = json.loads(body).get("subscription") or {}
                found = self.subscriptions.get(str(wanted.get("external_id")))
                if found is None:
                    if wanted.get("external_customer_id") not in self.customers:
                        return _unprocessable({"external_customer_id": ["customer_not_found"]})
                    found = self.subscriptions[wanted["external_id"]] = {
                        "external_id": wanted["external_id"],
                        "external_customer_id": wanted["external_customer_id"],
                        "plan_code": wanted.get("plan_code"),
                        "started_at": "2026-01-01T00:00:00Z",
                        "terminated_at": None,
                        "status": "active",
                    }
                self.writes[("subscriptions", found["external_id"])] += 1
                return 200, {}, {"subscription": dict(found)}
            root, id_field = self.RESOURCES[name]
            store: dict[str, dict[str, Any]] = getattr(self, name)
            if method == "GET":
                assert key is not None
                if key not in store:
                    return 404, {}, {"status": 404, "error": "Not Found", "code": f"{root}_not_found"}
                return 200, {}, {root: dict(store[key])}
            wanted = json.loads(body).get(root) or {}
            key = key or wanted.get(id_field)
            if not key:
                return _unprocessable({id_field: ["value_is_mandatory"]})
            if method == "PUT" and key not in store:
                return 404, {}, {"status": 404, "error": "Not Found", "code": f"{root}_not_found"}
            if method == "POST" and name == "billable_metrics" and key in store:
                return _unprocessable({"code": ["value_already_exist"]})
            store[key] = {**store.get(key, {}), **wanted, id_field: key}  # POST /customers upserts
            self.writes[(name, key)] += 1
            return 200, {}, {root: dict(store[key])}

    def _index(self, query: dict[str, list[str]]) -> tuple[int, dict[str, str], Any]:
        """``EventsController#index`` -> ``EventsQuery``: filters ``code``, ``external_subscription_id``,
        ``timestamp_from``/``timestamp_to`` (ISO 8601, inclusive), ordered by timestamp desc then transaction_id,
        paginated (``page``, ``per_page``, default 100) with ``meta`` as ``Pagination#pagination_metadata``."""

        def one(name: str) -> str | None:
            return query.get(name, [None])[0]

        low, high = (one(name) for name in ("timestamp_from", "timestamp_to"))
        bounds = [round(datetime.fromisoformat(value).timestamp() * 1000) if value else None for value in (low, high)]
        with self.lock:
            found = [
                event
                for event in self.store.values()
                if (one("code") is None or event["code"] == one("code"))
                and (
                    one("external_subscription_id") is None
                    or event["external_subscription_id"] == one("external_subscription_id")
                )
                and (bounds[0] is None or round(self._instant(event) * 1000) >= bounds[0])
                and (bounds[1] is None or round(self._instant(event) * 1000) <= bounds[1])
            ]
        found.sort(key=lambda event: event["transaction_id"])
        found.sort(key=self._instant, reverse=True)
        per_page = max(1, int(one("per_page") or 100))
        page = max(1, int(one("page") or 1))
        total_pages = (len(found) + per_page - 1) // per_page
        chunk = found[(page - 1) * per_page : page * per_page]
        meta = {
            "current_page": page if found else 0,
            "next_page": page + 1 if page < total_pages else None,
            "prev_page": page - 1 if page > 1 and found else None,
            "total_pages": total_pages,
            "total_count": len(found),
        }
        return 200, {}, {"events": [self._serialize(event) for event in chunk], "meta": meta}

    def _instant(self, event: dict[str, Any]) -> float:
        seconds = self._seconds(event["timestamp"])
        return float(seconds) if seconds is not None else 0.0

    def _serialize(self, event: dict[str, Any]) -> dict[str, Any]:
        """``V1::EventSerializer``: the timestamp as ISO 8601 with milliseconds."""
        moment = datetime.fromtimestamp(self._instant(event), tz=UTC)
        return {**event, "timestamp": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")}

    def _single(self, event: Any) -> tuple[int, dict[str, str], Any]:
        status, extra, payload = self._batch([event])
        if status == 200:
            return 200, extra, {"event": payload["events"][0]}
        if status == 422 and "0" in payload.get("error_details", {}):
            return _unprocessable(payload["error_details"]["0"])
        return status, extra, payload

    def _batch(self, events: Any) -> tuple[int, dict[str, str], Any]:
        if not events:  # missing, null, empty: `events_params.blank?`
            return _unprocessable({"events": ["no_events"]})
        if not isinstance(events, list):
            events = [events]  # strong params read a lone object as one event
        if len(events) > self.max_batch:
            return _unprocessable({"events": ["too_many_events"]})
        with self.lock:
            details: dict[str, Any] = {}
            permitted = [self._permit(event) for event in events]
            if self.crash_on is not None and any(self.crash_on in event["properties"] for event in permitted):
                return 500, {}, {"status": 500, "error": "Internal Server Error"}
            for index, event in enumerate(permitted):
                errors = self._validate(event)
                if errors:
                    details[str(index)] = errors
            if not details and self.dedupe == "postgres":
                details = self._duplicates(permitted)
            if details:  # all or nothing
                return _unprocessable(details)
            stored = [self._store(event) for event in permitted]
        return 200, {}, {"events": stored}

    @staticmethod
    def _permit(event: Any) -> dict[str, Any]:
        """Strong params: the known fields only; ids and code cast to strings; ``properties`` an object or ``{}``."""
        if not isinstance(event, dict):
            event = {}
        permitted: dict[str, Any] = {}
        for name in ("transaction_id", "external_subscription_id", "code", "precise_total_amount_cents"):
            value = event.get(name)
            if isinstance(value, str | int | float) and not isinstance(value, bool):
                permitted[name] = str(value)
        if "timestamp" in event:
            permitted["timestamp"] = event["timestamp"]
        properties = event.get("properties")
        permitted["properties"] = properties if isinstance(properties, dict) else {}
        return permitted

    @staticmethod
    def _seconds(timestamp: Any) -> Decimal | None:
        """``BigDecimal(timestamp.to_s)``; ``None`` where Ruby raises (``invalid_format``)."""
        if isinstance(timestamp, bool) or not isinstance(timestamp, str | int | float):
            return None
        text = str(timestamp).strip()
        if not NUMERIC.match(text):
            return None
        return Decimal(text)

    def _validate(self, event: dict[str, Any]) -> dict[str, list[str]] | str:
        errors: dict[str, list[str]] = {}
        for name in ("transaction_id", "code"):
            if not event.get(name, "").strip():
                errors[name] = ["value_is_mandatory"]
        if event.get("timestamp") is not None and self._seconds(event["timestamp"]) is None:
            errors["timestamp"] = ["invalid_format"]
        amount = event.get("precise_total_amount_cents")
        if amount is not None and not DECIMAL_STRING.match(amount):
            errors["precise_total_amount_cents"] = ["invalid_value"]
        if errors:
            return errors
        refusal = self.refuse_codes.get(event["code"])
        return f"expression_evaluation_failed: {refusal}" if refusal is not None else {}

    def _duplicates(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        """``bulk_insert_events``: ``insert_all`` skips pairs (subscription, id) already stored (or already in this
        statement) and returns the inserted rows, indexed by ``transaction_id`` alone; each event then takes its id
        out of that index in order: an event whose id is not (or no longer) there is ``value_already_exist``."""
        keys: set[tuple[str, str]] = set()
        inserted: set[str] = set()
        for event in events:
            key = (event.get("external_subscription_id", ""), event["transaction_id"])
            if key not in self.store and key not in keys:
                keys.add(key)
                inserted.add(event["transaction_id"])
        details = {}
        for index, event in enumerate(events):
            if event["transaction_id"] in inserted:
                inserted.discard(event["transaction_id"])
            else:
                details[str(index)] = {"transaction_id": ["value_already_exist"]}
        return details

    def _identity(self, event: dict[str, Any]) -> tuple[str, ...]:
        subscription = event.get("external_subscription_id", "")
        if self.dedupe == "postgres":
            return subscription, event["transaction_id"]
        seconds = self._seconds(event.get("timestamp"))
        return (
            event["code"],
            subscription,
            str(seconds.normalize() if seconds is not None else ""),
            event["transaction_id"],
        )

    def _store(self, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("timestamp") is None:
            event = {**event, "timestamp": f"{time.time():.3f}"}
        identity = self._identity(event)
        stored = {
            "lago_id": str(uuid.uuid4()),
            "transaction_id": event["transaction_id"],
            "lago_customer_id": None,
            "code": event["code"],
            "timestamp": event["timestamp"],
            "precise_total_amount_cents": event.get("precise_total_amount_cents"),
            "properties": event["properties"],
            "lago_subscription_id": None,
            "external_subscription_id": event.get("external_subscription_id"),
        }
        self.store[identity] = stored  # clickhouse: a repeat replaces
        self.writes[identity] += 1
        return stored


class FakeCollector(FakeServer):
    """A webhook receiver: HMAC-SHA256 over the raw body, each idempotency_key stored once, answers 2xx."""

    def __init__(self, secret: str, path: str = "/ingest", *, reject_metadata_key: str = "reject") -> None:
        super().__init__()
        self.secret = secret
        self.path = path
        self.reject_metadata_key = reject_metadata_key
        self._reset_store()

    def _reset_store(self) -> None:
        self.store: dict[str, dict[str, Any]] = {}
        self.repeats: Counter[str] = Counter()

    def keys_of(self, body: bytes) -> list[str]:
        try:
            return [str(event["idempotency_key"]) for event in json.loads(body)["events"]]
        except (ValueError, KeyError, TypeError):
            return []

    def stored_keys(self) -> Counter[str]:
        with self.lock:
            return Counter(list(self.store))

    def process(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], Any]:
        if method != "POST" or path != self.path:
            return 404, {}, {"error": "not found"}
        expected = "sha256=" + hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(headers.get("X-Metering-Signature") or "", expected):
            return 401, {}, {"error": "bad signature"}
        try:
            events = json.loads(body)["events"]
        except (ValueError, KeyError, TypeError):
            return 400, {}, {"error": 'body must be {"events": [...]}'}
        required = ("idempotency_key", "tenant_id", "transaction_id", "feature", "quantity", "units", "timestamp")
        errors = {}
        for index, event in enumerate(events):
            if not isinstance(event, dict) or any(name not in event for name in required):
                errors[str(index)] = "missing fields"
            elif self.reject_metadata_key in (event.get("metadata") or {}):
                errors[str(index)] = f"metadata {self.reject_metadata_key!r} refused"
        if errors:
            return 422, {}, {"errors": errors}
        with self.lock:
            for event in events:
                if event["idempotency_key"] in self.store:
                    self.repeats[event["idempotency_key"]] += 1
                else:
                    self.store[event["idempotency_key"]] = event
        return 200, {}, {"accepted": len(events)}


def main() -> None:
    """``python -m tests.lago_server [--port N] [--api-key KEY]``: serve a FakeLago until interrupted."""
    import argparse

    parser = argparse.ArgumentParser(description="A strict fake Lago events API on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="lago-test-key")
    parser.add_argument("--max-batch", type=int, default=100)
    args = parser.parse_args()
    server = FakeLago(args.api_key, max_batch=args.max_batch)
    server.start_on(args.port)
    print(f"READY {server.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
