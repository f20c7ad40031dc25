"""What every sink shares: the result of one request, the pooled HTTP client, backoff and rate-limit headers."""

from __future__ import annotations

import base64
import contextlib
import email.utils
import enum
import functools
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx
from django.core.checks import CheckMessage
from django.utils.crypto import salted_hmac
from django.utils.module_loading import import_string

from ...conf import metering_settings
from ...exceptions import MeteringError
from ..outbox import ClaimedFact

USER_AGENT = "django-xaas-metering/0.1"
MAX_HONOURED_WAIT = 3600.0  # a Retry-After beyond an hour is treated as an hour
BLOCKING_STATUSES = frozenset({401, 403, 404, 405, 410})  # the configuration is wrong: retrying cannot help
TRANSIENT_STATUSES = frozenset({408, 425, 429})
REDACTED = "[redacted]"


class SinkNotConfigured(MeteringError):
    """The requested sink is not the one ``METERING["ADAPTER"]`` delivers to, or its settings are incomplete."""


class Outcome(enum.Enum):
    OK = "ok"  # the whole batch is stored
    REJECTED = "rejected"  # nothing stored; ``duplicates``/``invalid`` name indexes, or the batch as a whole
    TRANSIENT = "transient"  # unknown or not stored; try the same batch again later
    BLOCKED = "blocked"  # credentials or URL refused: stop delivering until the configuration changes


class Confirmation(enum.Enum):
    HELD = "held"  # the sink holds this very event: delivered
    CONFLICT = "conflict"  # the sink holds another event under its key: never delivered, an operator decides
    UNKNOWN = "unknown"  # not found, or the check itself failed: try again later


@dataclass
class Check:
    outcome: Confirmation
    reason: str = ""


@dataclass
class SendResult:
    outcome: Outcome
    status: int | None = None
    error: str = ""
    duplicates: set[int] = field(default_factory=set)
    """Indexes the sink already holds (Lago's ``value_already_exist``): delivered by an earlier attempt."""
    invalid: dict[int, str] = field(default_factory=dict)
    """Indexes the sink rejects for their own content, with its error."""
    retry_after: float | None = None


class Sink:
    """One delivery target. Subclasses set ``name`` and implement ``build`` and ``send``; an adapter delivers to one
    by naming its class (``OutboxMeteringAdapter.sink_class``, a dotted path: a project's own sink needs no
    registration)."""

    name: ClassVar[str] = ""  # stored on every outbox row of this sink: short, and never changed once in use
    needs_subscription: ClassVar[bool] = False
    secret_setting: ClassVar[str] = ""  # the METERING key holding the credential (its name, not its value)
    secret_required: ClassVar[bool] = True  # the system checks require ``secret_setting`` to be set
    url_setting: ClassVar[str] = "SINK_URL"  # the METERING key holding the URL (the system checks require it)

    @property
    def batch_size(self) -> int:
        """Facts per claimed batch (one request unless the sink refuses part of it)."""
        return int(metering_settings.BATCH_SIZE)

    def prepare(self, facts: list[ClaimedFact]) -> None:
        """Called with each claimed batch before ``build``: a sink may look up what its rows need in one query."""

    @property
    def url(self) -> str:
        url = metering_settings.SINK_URL
        if not url:
            raise SinkNotConfigured(f"METERING['SINK_URL'] is not set: the {self.name} sink has nowhere to deliver")
        return str(url)

    @property
    def secret(self) -> str:
        value = getattr(metering_settings, self.secret_setting) if self.secret_setting else None
        if not value:
            raise SinkNotConfigured(f"METERING[{self.secret_setting!r}] is not set: the {self.name} sink needs it")
        return str(value)

    def configuration_error(self) -> str | None:
        """Why this sink cannot deliver with the current settings (the system checks say it at startup too)."""
        try:
            self.url  # noqa: B018 (raises when missing)
            self.secret  # noqa: B018
        except SinkNotConfigured as error:
            return str(error)
        return None

    def fingerprint(self) -> str:
        """A keyed hash (HMAC with ``SECRET_KEY``) of everything that decides whether the sink lets us in. Keyed, so
        the stored value cannot be checked offline against guessed credentials."""
        material = "\0".join([self.name, str(metering_settings.SINK_URL or ""), self._secret_or_empty()])
        # The salt is a constant (where the sinks lived once): changing it would void every stored fingerprint.
        return salted_hmac("metering.sinks.fingerprint", material, algorithm="sha256").hexdigest()[:32]

    def secret_values(self) -> list[str]:
        """Every credential of this sink as it travels: the secret, the URL's user and password, and their ``Basic``
        base64 (the ``Authorization`` header a collector may echo)."""
        values: set[str] = set()
        secret = self._secret_or_empty()
        parts = urlsplit(str(metering_settings.SINK_URL or ""))
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
        values.update(value for value in (secret, user, password) if value)
        if user or password:
            values.add(base64.b64encode(f"{user}:{password}".encode()).decode())
        return sorted(values)

    def redact(self, text: str) -> str:
        """``text`` without any of this sink's credentials (``secret_values``) in any form an answer may write them
        in (``secret_pattern``): what we store and log of an answer."""
        pattern = secret_pattern(tuple(self.secret_values()))
        return text if pattern is None else pattern.sub(REDACTED, text)

    def redacted(self, result: SendResult) -> SendResult:
        """``result`` with every error text redacted, before anything stores or logs it."""
        result.error = self.redact(result.error)
        result.invalid = {index: self.redact(error) for index, error in result.invalid.items()}
        return result

    def excerpt(self, response: httpx.Response, limit: int = 500) -> str:
        """The start of an answer for operators, redacted *before* it is cut (a cut must not leave half a secret)."""
        return excerpt(response, limit, redact=self.redact)

    def _secret_or_empty(self) -> str:
        try:
            return self.secret
        except SinkNotConfigured:
            return ""

    def safe_url(self) -> str:
        """The sink URL without any user:password part, for logs and operators."""
        return redact_url(str(metering_settings.SINK_URL or ""))

    @classmethod
    def system_checks(cls) -> list[CheckMessage]:
        """This sink's own warnings about the settings, run by metering's system checks when it is configured."""
        return []

    def build(self, fact: ClaimedFact) -> dict[str, Any]:
        raise NotImplementedError

    def freeze(self, fact: ClaimedFact) -> str:
        """The fact's event as stored on its outbox row at the first send; every resend decodes and sends it."""
        return encode(self.build(fact)).decode()

    def batch_key(self, event: dict[str, Any]) -> str | None:
        """The key no two events of one request may share (``None``: no such rule)."""
        return None

    def confirm(self, event: dict[str, Any]) -> Check:
        """Whether the sink holds ``event``, after it answered that the event's key already exists."""
        return Check(Confirmation.HELD)

    def send(self, events: list[dict[str, Any]]) -> SendResult:
        raise NotImplementedError

    # helpers for subclasses

    def endpoint(self, path: str = "") -> tuple[str, httpx.BasicAuth | None]:
        """The URL to POST to, without any ``user:password@`` (httpx would log it), and those as Basic auth."""
        parts = urlsplit(self.url)
        if parts.username is None and parts.password is None:
            return self.url.rstrip("/") + path if path else self.url, None
        clean = redact_url(self.url, mask="")
        auth = httpx.BasicAuth(unquote(parts.username or ""), unquote(parts.password or ""))
        return (clean.rstrip("/") + path if path else clean), auth

    def post(
        self, url: str, body: bytes, headers: Mapping[str, str], auth: httpx.BasicAuth | None = None
    ) -> httpx.Response | SendResult:
        """POST ``body``; a transport failure comes back as a ``SendResult`` (transient, or blocked for a bad URL)."""
        try:
            client = http_client()
            if auth is not None:
                return client.post(url, content=body, headers={"User-Agent": USER_AGENT, **headers}, auth=auth)
            return client.post(url, content=body, headers={"User-Agent": USER_AGENT, **headers})
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as error:
            return SendResult(Outcome.BLOCKED, error=f"invalid sink URL: {type(error).__name__}")
        except httpx.TimeoutException as error:
            return SendResult(Outcome.TRANSIENT, error=f"timeout: {type(error).__name__}")
        except httpx.TransportError as error:
            return SendResult(Outcome.TRANSIENT, error=f"network error: {type(error).__name__}: {error}"[:500])

    def get(self, url: str, headers: Mapping[str, str]) -> httpx.Response | SendResult:
        """GET ``url``; a transport failure comes back as a transient ``SendResult``."""
        try:
            return http_client().get(url, headers={"User-Agent": USER_AGENT, **headers})
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as error:
            return SendResult(Outcome.BLOCKED, error=f"invalid sink URL: {type(error).__name__}")
        except httpx.TimeoutException as error:
            return SendResult(Outcome.TRANSIENT, error=f"timeout: {type(error).__name__}")
        except httpx.TransportError as error:
            return SendResult(Outcome.TRANSIENT, error=f"network error: {type(error).__name__}: {error}"[:500])

    def classify_status(self, response: httpx.Response) -> SendResult | None:
        """Statuses every sink treats alike; ``None`` for the sink's own handling (2xx and other 4xx)."""
        status = response.status_code
        if status in BLOCKING_STATUSES:
            return SendResult(Outcome.BLOCKED, status, f"{status} {self.excerpt(response)}")
        if status in TRANSIENT_STATUSES or status >= 500:
            hint = retry_after(response.headers)
            return SendResult(Outcome.TRANSIENT, status, f"{status} {self.excerpt(response)}", retry_after=hint)
        return None


_JSON_SHORT_ESCAPES = {"\b": "b", "\f": "f", "\n": "n", "\r": "r", "\t": "t"}


def _hex(number: int, digits: int) -> str:
    """``number`` in hex as a regex matching either case of each digit (``%2f`` and ``%2F``)."""
    return "".join(f"[{d.lower()}{d.upper()}]" if d.isalpha() else d for d in format(number, f"0{digits}x"))


def _char_pattern(char: str) -> str:
    """Every way an answer may write ``char``: itself; backslash-escaped (JSON's ``\\"``, PHP's ``\\/``); a JSON
    ``\\uXXXX`` (a surrogate pair beyond the BMP); percent-encoded UTF-8 in either case; an HTML entity; ``+``
    for a space (form encoding)."""
    code = ord(char)
    forms = [re.escape(char), re.escape("\\" + char), "".join(f"%{_hex(byte, 2)}" for byte in char.encode())]
    if code < 0x10000:
        forms.append(r"\\u" + _hex(code, 4))
    else:
        high, low = divmod(code - 0x10000, 0x400)
        forms.append(r"\\u" + _hex(0xD800 + high, 4) + r"\\u" + _hex(0xDC00 + low, 4))
    forms += [f"&#[xX]0*{_hex(code, 1)};", f"&#0*{code};"]
    named = {"&": "amp", "<": "lt", ">": "gt", '"': "quot", "'": "apos"}.get(char)
    if named:
        forms.append(f"&{named};")
    if char in _JSON_SHORT_ESCAPES:
        forms.append(re.escape("\\" + _JSON_SHORT_ESCAPES[char]))
    if char == " ":
        forms.append(r"\+")
    return "(?:" + "|".join(forms) + ")"


@functools.lru_cache(maxsize=32)
def secret_pattern(values: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex matching each of ``values`` written in any mix of the forms of ``_char_pattern``, longest value
    first (a secret that contains another is replaced whole); ``None`` without values. Matching the forms
    character by character, not a list of whole-string encodings, is what catches an echo escaped by another
    stack (PHP's ``json_encode``, an encoder writing ``\\u002F``, a form in lower-case ``%2f``, HTML)."""
    if not values:
        return None
    ordered = sorted(values, key=len, reverse=True)
    return re.compile("|".join("".join(_char_pattern(char) for char in value) for value in ordered))


def encode(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def excerpt(response: httpx.Response, limit: int = 500, redact: Callable[[str], str] | None = None) -> str:
    text = response.text.strip()
    if redact is not None:
        text = redact(text)
    return text if len(text) <= limit else text[:limit] + "..."


def redact_url(url: str, mask: str = "***@") -> str:
    """``url`` with any ``user:password@`` replaced by ``mask`` (``""`` removes it)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = mask + host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or an HTTP date) or ``X-RateLimit-Reset`` (seconds until the
    reset, as Lago Cloud sends it; a value that looks like a Unix time is read as one). ``None``: no hint."""
    now = time.time() if now is None else now
    waits: list[float] = []
    value = headers.get("Retry-After")
    if value:
        try:
            waits.append(float(value))
        except ValueError:
            with contextlib.suppress(TypeError, ValueError, IndexError):
                waits.append(email.utils.parsedate_to_datetime(value).timestamp() - now)
    value = headers.get("X-RateLimit-Reset")
    if value:
        try:
            reset = float(value)
        except ValueError:
            pass
        else:
            waits.append(reset - now if reset > 1_000_000_000 else reset)
    waits = [wait for wait in waits if wait == wait]  # drop NaN
    if not waits:
        return None
    return min(max(0.0, max(waits)), MAX_HONOURED_WAIT)


def backoff(attempts: int, hint: float | None = None) -> float:
    """Seconds before attempt ``attempts + 1``: exponential with equal jitter, never shorter than the server's hint."""
    base = float(metering_settings.SINK_RETRY_BASE_SECONDS)
    cap = float(metering_settings.SINK_RETRY_MAX_SECONDS)
    delay = min(cap, base * 2.0 ** min(max(attempts - 1, 0), 60))
    delay = delay / 2 + random.uniform(0, delay / 2)
    if hint is not None:
        delay = max(delay, hint)
    return delay


# --- one pooled client per process --------------------------------------------------------------------------------

_clients: dict[tuple[int, float], httpx.Client] = {}
_clients_lock = threading.Lock()


def http_client() -> httpx.Client:
    """The process's pooled client (keep-alive connections reused by every batch). Rebuilt after a fork."""
    timeout = float(metering_settings.SINK_TIMEOUT_SECONDS)
    key = (os.getpid(), timeout)
    client = _clients.get(key)
    if client is None:
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                client = httpx.Client(
                    timeout=httpx.Timeout(timeout),
                    limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
                    follow_redirects=False,
                    trust_env=False,
                )
                _clients[key] = client
    return client


def close_clients() -> None:
    with _clients_lock:
        for key, client in list(_clients.items()):
            if key[0] == os.getpid():
                client.close()
            del _clients[key]


# --- the configured sink: the adapter's ``sink_class``, a dotted path -------------------------------------------

SINK_NAME_MAX_LENGTH = 20  # UsageOutbox.sink and SinkState.sink


@functools.lru_cache(maxsize=32)
def sink_class_at(path: str) -> type[Sink]:
    """The ``Sink`` subclass at dotted ``path`` (``"metering.delivery.sinks.lago.LagoSink"``, or a project's own).
    ``SinkNotConfigured`` when the path does not import, is not a ``Sink``, or its ``name`` cannot be stored."""
    try:
        sink_class = import_string(path)
    except ImportError as error:
        raise SinkNotConfigured(f"sink class {path!r} cannot be imported: {error}") from None
    if not isinstance(sink_class, type) or not issubclass(sink_class, Sink):
        raise SinkNotConfigured(f"{path!r} is not a subclass of metering.delivery.sinks.Sink")
    name = sink_class.name
    if not isinstance(name, str) or not 0 < len(name) <= SINK_NAME_MAX_LENGTH:
        raise SinkNotConfigured(
            f"sink class {path!r} must set name to a short string (1-{SINK_NAME_MAX_LENGTH} characters): the outbox "
            "rows store it"
        )
    return sink_class


def configured_sink_class() -> type[Sink] | None:
    """The sink class of the configured adapter (its ``sink_class`` path), or ``None`` (nothing to deliver).
    ``SinkNotConfigured`` for a path that names no usable sink (the system checks report it: E014)."""
    try:
        adapter = import_string(str(metering_settings.ADAPTER))
    except ImportError:
        return None
    path = getattr(adapter, "sink_class", None)
    if not path:
        return None
    if not isinstance(path, str):
        raise SinkNotConfigured(f"{metering_settings.ADAPTER}.sink_class must be a dotted path, got {path!r}")
    return sink_class_at(path)


def configured_sink_classes() -> list[type[Sink]]:
    """Every sink facts are delivered to: ``METERING["SINKS"]`` (dotted paths) when set, else the adapter's own
    ``sink_class`` (``[]`` for an adapter without an outbox). ``SinkNotConfigured`` for a path that names no sink,
    for two sinks of one name, and for ``SINKS`` beside an adapter that keeps no outbox."""
    own = configured_sink_class()
    paths = metering_settings.SINKS
    if paths is None:
        return [own] if own is not None else []
    if isinstance(paths, str) or not isinstance(paths, list | tuple):
        raise SinkNotConfigured("METERING['SINKS'] must be a list of dotted paths of Sink subclasses")
    if own is None:
        raise SinkNotConfigured(
            "METERING['SINKS'] needs an outbox adapter (e.g. metering.adapters.lago.LagoMeteringAdapter): "
            "the configured METERING['ADAPTER'] queues nothing"
        )
    classes = [sink_class_at(str(path)) for path in paths]
    names = [sink_class.name for sink_class in classes]
    if len(set(names)) != len(names) or not names:
        raise SinkNotConfigured(f"METERING['SINKS'] must name one or more sinks of distinct names, got {names}")
    return classes


def configured_sink_names() -> list[str]:
    try:
        return [sink_class.name for sink_class in configured_sink_classes()]
    except SinkNotConfigured:
        return []


def configured_sink_name() -> str | None:
    """The short name the configured sink stores on its outbox rows (``"lago"``), or ``None``."""
    try:
        sink_class = configured_sink_class()
    except SinkNotConfigured:
        return None
    return sink_class.name if sink_class is not None else None


def get_sink(name: str | None = None) -> Sink | None:
    """The configured sink named ``name`` (default: the first of ``configured_sink_classes``). ``SinkNotConfigured``
    for a sink that is not configured (its URL and credentials are not the ones in the settings)."""
    classes = configured_sink_classes()
    if name is None:
        return classes[0]() if classes else None
    for sink_class in classes:
        if sink_class.name == name:
            return sink_class()
    configured = ", ".join(sink_class.name for sink_class in classes) or "none"
    raise SinkNotConfigured(
        f"sink {name!r} is not the configured one ({configured}): METERING['ADAPTER'] and METERING['SINKS'] decide"
    )
