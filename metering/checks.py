"""System checks of ``settings.METERING``."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register
from django.utils.module_loading import import_string

from .conf import KNOWN_KEYS, metering_settings


@register()
def check_metering_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    raw = getattr(settings, "METERING", {})
    if not isinstance(raw, dict):
        return [Error("settings.METERING must be a dict.", id="xaas_metering.E000")]
    for unknown in sorted(set(raw) - KNOWN_KEYS):
        messages.append(
            Warning(
                f"METERING[{unknown!r}] is not a known key and is ignored.",
                hint=f"Known keys: {', '.join(sorted(KNOWN_KEYS))}.",
                id="xaas_metering.W001",
            )
        )
    try:
        import_string(str(metering_settings.ADAPTER))
    except ImportError as error:
        messages.append(
            Error(
                f"METERING['ADAPTER'] = {metering_settings.ADAPTER!r} cannot be imported: {error}",
                hint="Use 'metering.adapters.database.DatabaseMeteringAdapter' or the dotted path of your own.",
                id="xaas_metering.E001",
            )
        )
    batch_size = metering_settings.BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 10_000:
        messages.append(
            Error(
                f"METERING['BATCH_SIZE'] must be an integer from 1 to 10000, got {batch_size!r}.",
                id="xaas_metering.E002",
            )
        )
    sink_url = metering_settings.SINK_URL
    if sink_url is not None:
        parsed = urlparse(str(sink_url))
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            messages.append(
                Error(f"METERING['SINK_URL'] must be an http(s) URL, got {sink_url!r}.", id="xaas_metering.E003")
            )
    if metering_settings.DATABASE_ALIAS not in settings.DATABASES:
        messages.append(
            Error(
                f"METERING['DATABASE_ALIAS'] = {metering_settings.DATABASE_ALIAS!r} is not in DATABASES.",
                id="xaas_metering.E004",
            )
        )
    from .events import max_quantity_problem  # units are int64: MAX_QUANTITY * 10**6 must fit

    if (problem := max_quantity_problem(metering_settings.MAX_QUANTITY)) is not None:
        messages.append(Error(f"METERING['MAX_QUANTITY'] {problem}.", id="xaas_metering.E006"))
    for key in (
        "MAX_METADATA_BYTES",
        "FUTURE_TOLERANCE_SECONDS",
        "COUNTER_TTL_SECONDS",
        "MAX_FEATURE_NAME_LENGTH",
        "LOG_DEDUP_SECONDS",
    ):
        value = getattr(metering_settings, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            messages.append(
                Error(f"METERING[{key!r}] must be a positive integer, got {value!r}.", id="xaas_metering.E005")
            )
    slots = metering_settings.ROLLUP_SLOTS
    if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= 99:
        messages.append(
            Error(f"METERING['ROLLUP_SLOTS'] must be an integer from 1 to 99, got {slots!r}.", id="xaas_metering.E036")
        )
    messages.extend(_abuse_bound_problems())
    return messages


def _abuse_bound_problems() -> list[CheckMessage]:
    """The abuse bounds (E030-E035): each invalid value is an error, never a silent fallback to no bound."""
    from .api.events import MAX_EVENTS
    from .api.throttling import parse_rate
    from .events import duration_problem, features_problem
    from .features import registry_problem

    messages: list[CheckMessage] = []
    for key, check_id in (("MAX_FEATURES_PER_TREE", "E030"), ("MAX_FEATURES_PER_KEY", "E035")):
        value = getattr(metering_settings, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            messages.append(
                Error(
                    f"METERING[{key!r}] must be None or a positive integer, got {value!r}.",
                    id=f"xaas_metering.{check_id}",
                )
            )
    if (problem := features_problem(metering_settings.FEATURES)) is not None:
        messages.append(Error(f"METERING['FEATURES'] {problem}.", id="xaas_metering.E031"))
    if (problem := registry_problem(metering_settings.FEATURE_REGISTRY)) is not None:
        messages.append(Error(f"METERING['FEATURE_REGISTRY'] {problem}.", id="xaas_metering.E037"))
    for key in ("MAX_BACKDATE", "MAX_FUTURE"):
        if (problem := duration_problem(getattr(metering_settings, key))) is not None:
            messages.append(Error(f"METERING[{key!r}] {problem}.", id="xaas_metering.E032"))
    per_request = metering_settings.MAX_EVENTS_PER_REQUEST
    if isinstance(per_request, bool) or not isinstance(per_request, int) or not 1 <= per_request <= MAX_EVENTS:
        messages.append(
            Error(
                f"METERING['MAX_EVENTS_PER_REQUEST'] must be an integer from 1 to {MAX_EVENTS}, got {per_request!r}.",
                id="xaas_metering.E033",
            )
        )
    try:
        parse_rate(metering_settings.API_RATE)
    except ValueError as error:
        messages.append(Error(f"METERING['API_RATE'] {error}.", id="xaas_metering.E034"))
    return messages


@register()
def check_delivery_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The outbox sinks' keys (docs/lago.md). Errors for the configured sink's missing URL or credentials."""
    if not isinstance(getattr(settings, "METERING", {}), dict):
        return []
    from .delivery.sinks.base import SinkNotConfigured, configured_sink_classes

    messages: list[CheckMessage] = []
    try:
        sink_classes = configured_sink_classes()
    except SinkNotConfigured as error:
        sink_classes = []
        messages.append(
            Error(
                f"METERING['ADAPTER'] or METERING['SINKS'] names no usable sink: {error}.",
                hint="An adapter's sink_class is the dotted path of a metering.delivery.sinks.Sink subclass.",
                id="xaas_metering.E050",
            )
        )
    for sink_class in sink_classes:
        sink = sink_class.name
        if sink_class.url_setting == "SINK_URL" and not metering_settings.SINK_URL:
            messages.append(Error(f"METERING['SINK_URL'] is required by the {sink} sink.", id="xaas_metering.E010"))
        secret_key = sink_class.secret_setting
        secret = getattr(metering_settings, secret_key, None) if secret_key else ""
        if secret_key and sink_class.secret_required and (not isinstance(secret, str) or not secret):
            messages.append(
                Error(
                    f"METERING[{secret_key!r}] must be a non-empty string for the {sink} sink.", id="xaas_metering.E011"
                )
            )
        messages.extend(sink_class.system_checks())
    metrics = metering_settings.LAGO_METRICS
    if not isinstance(metrics, dict) or not all(_valid_metric(entry) for entry in metrics.values()):
        messages.append(
            Error(
                "METERING['LAGO_METRICS'] must map feature names to a metric code or to "
                '{"code": str, "property": str, "metadata": bool or list of keys}.',
                id="xaas_metering.E012",
            )
        )
    if not isinstance(metering_settings.LAGO_QUANTITY_PROPERTY, str) or not metering_settings.LAGO_QUANTITY_PROPERTY:
        messages.append(
            Error("METERING['LAGO_QUANTITY_PROPERTY'] must be a non-empty string.", id="xaas_metering.E013")
        )
    numbers = {}
    for key in (
        "SINK_TIMEOUT_SECONDS",
        "SINK_LEASE_SECONDS",
        "SINK_RETRY_BASE_SECONDS",
        "SINK_RETRY_MAX_SECONDS",
        "TRIGGER_DEBOUNCE_SECONDS",
    ):
        value = getattr(metering_settings, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            messages.append(
                Error(f"METERING[{key!r}] must be a positive number, got {value!r}.", id="xaas_metering.E014")
            )
        else:
            numbers[key] = float(value)
    lease, timeout = numbers.get("SINK_LEASE_SECONDS"), numbers.get("SINK_TIMEOUT_SECONDS")
    if lease is not None and timeout is not None and lease < 3 * timeout:
        messages.append(
            Error(
                f"METERING['SINK_LEASE_SECONDS'] ({lease:g}) must be at least 3 x SINK_TIMEOUT_SECONDS ({timeout:g}):"
                " a batch still in flight would be claimed again by another worker.",
                id="xaas_metering.E015",
            )
        )
    for key in ("SINK_MAX_ATTEMPTS", "FLUSH_MAX_BATCHES", "SINK_BISECT_AFTER"):
        value = getattr(metering_settings, key)
        if (key == "SINK_MAX_ATTEMPTS" and value is None) or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ):
            continue
        messages.append(Error(f"METERING[{key!r}] must be a positive integer, got {value!r}.", id="xaas_metering.E016"))
    queue = metering_settings.CELERY_QUEUE
    if queue is not None and (not isinstance(queue, str) or not queue):
        messages.append(Error("METERING['CELERY_QUEUE'] must be None or a queue name.", id="xaas_metering.E017"))
    webhook_secret = metering_settings.WEBHOOK_SECRET
    if webhook_secret is not None and not isinstance(webhook_secret, str):
        messages.append(Error("METERING['WEBHOOK_SECRET'] must be a string.", id="xaas_metering.E018"))
    return messages


def _valid_metric(entry: object) -> bool:
    if isinstance(entry, str):
        return bool(entry)
    if not isinstance(entry, dict) or set(entry) - {"code", "property", "metadata"}:
        return False
    if not all(isinstance(entry.get(key, "x"), str) and entry.get(key, "x") for key in ("code", "property")):
        return False
    metadata = entry.get("metadata", True)
    return isinstance(metadata, bool) or (isinstance(metadata, list) and all(isinstance(k, str) for k in metadata))


@register()
def check_redis_timeouts(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The metering cache on django-redis: socket timeouts and the circuit breaker, or a hung Redis hangs requests."""
    if not isinstance(getattr(settings, "METERING", {}), dict):
        return []
    config = getattr(settings, "CACHES", {}).get(metering_settings.CACHE_ALIAS)
    if not isinstance(config, dict) or not str(config.get("BACKEND", "")).startswith("django_redis."):
        return []
    options = config.get("OPTIONS") or {}
    messages: list[CheckMessage] = []
    missing = [name for name in ("SOCKET_CONNECT_TIMEOUT", "SOCKET_TIMEOUT") if not options.get(name)]
    if missing:
        messages.append(
            Warning(
                f"The metering cache {metering_settings.CACHE_ALIAS!r} (django-redis) has no "
                f"{' / '.join(missing)}: a hung Redis makes every request wait without bound.",
                hint='Set OPTIONS["SOCKET_CONNECT_TIMEOUT"] and OPTIONS["SOCKET_TIMEOUT"] (e.g. 0.5 seconds).',
                id="xaas_metering.W020",
            )
        )
    if not _behind_breaker(options):
        messages.append(
            Warning(
                f"The metering cache {metering_settings.CACHE_ALIAS!r} (django-redis) has no circuit breaker: "
                "while Redis is hung every call pays its own timeout.",
                hint='Set OPTIONS["CONNECTION_POOL_CLASS"] = "metering.breaker.BreakerConnectionPool".',
                id="xaas_metering.W021",
            )
        )
    return messages


def _behind_breaker(options: dict[str, Any]) -> bool:
    from .breaker import BreakerConnectionPool, BreakerMixin

    try:
        pool_class = import_string(str(options.get("CONNECTION_POOL_CLASS", "redis.connection.ConnectionPool")))
    except ImportError:
        return False
    connection_class = (options.get("CONNECTION_POOL_KWARGS") or {}).get("connection_class")
    return (isinstance(pool_class, type) and issubclass(pool_class, BreakerConnectionPool)) or (
        isinstance(connection_class, type) and issubclass(connection_class, BreakerMixin)
    )


@register()
def check_log_mode(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """``WRITE_MODE = "log"``: durability is Redis's, so Redis must be django-redis and persist with AOF."""
    if not isinstance(getattr(settings, "METERING", {}), dict) or metering_settings.WRITE_MODE != "log":
        return []
    alias = metering_settings.CACHE_ALIAS
    config = getattr(settings, "CACHES", {}).get(alias)
    if not isinstance(config, dict) or not str(config.get("BACKEND", "")).startswith("django_redis."):
        return [
            Error(
                f"METERING['WRITE_MODE'] is 'log' but the metering cache {alias!r} is not django-redis: log mode "
                "keeps admitted facts in Redis streams until the drainer persists them.",
                hint="Point CACHES[METERING['CACHE_ALIAS']] at a Redis with AOF (django_redis.cache.RedisCache), or "
                "use WRITE_MODE 'commit'.",
                id="xaas_metering.E040",
            )
        ]
    return _redis_persistence(config)


def _redis_persistence(config: dict[str, Any]) -> list[CheckMessage]:
    """Ask the server for its persistence settings, with a client of its own (short timeouts, outside the circuit
    breaker, so a Redis that is down at check time costs one second and a warning, never a crash)."""
    import redis

    location = config.get("LOCATION")
    url = str(location[0] if isinstance(location, list | tuple) and location else location or "")
    options = config.get("OPTIONS") or {}
    try:
        client = redis.Redis.from_url(
            url, socket_timeout=1.0, socket_connect_timeout=1.0, password=options.get("PASSWORD") or None
        )
        try:
            client.ping()
            try:
                found = {
                    str(k, "utf-8") if isinstance(k, bytes) else str(k): v
                    for k, v in client.config_get("append*").items()
                }
            except redis.ResponseError:
                return [
                    Warning(
                        "Log mode: Redis refused CONFIG GET, so its persistence (appendonly, appendfsync) cannot be "
                        "verified.",
                        hint="Make sure the server runs with appendonly yes (appendfsync everysec or always); see the "
                        "README, 'Log mode durability'.",
                        id="xaas_metering.W041",
                    )
                ]
        finally:
            client.close()
    except (redis.RedisError, ValueError, OSError) as error:
        return [
            Warning(
                f"Log mode: Redis could not be asked for its persistence settings ({type(error).__name__}).",
                hint="Check that Redis is up and runs with appendonly yes.",
                id="xaas_metering.W042",
            )
        ]

    def value(name: str) -> str:
        raw = found.get(name, "")
        return (raw.decode() if isinstance(raw, bytes) else str(raw)).lower()

    if value("appendonly") != "yes":
        return [
            Error(
                "Log mode: the Redis server reports appendonly no: admitted facts not yet drained are lost when it "
                "restarts.",
                hint="Run Redis with appendonly yes (appendfsync everysec or always); see the README, 'Log mode "
                "durability'.",
                id="xaas_metering.E041",
            )
        ]
    if value("appendfsync") == "no":
        return [
            Warning(
                "Log mode: the Redis server runs with appendfsync no: a crash of its host loses the admitted facts "
                "the OS had not yet flushed (often ~30 s).",
                hint="Use appendfsync everysec (up to ~1 s lost) or always (nothing lost).",
                id="xaas_metering.W040",
            )
        ]
    return []


def _scheduled_tasks() -> set[str]:
    """The task names of the beat schedule, from Django's ``CELERY_BEAT_SCHEDULE`` and the current Celery app (a
    host project's ``celery.py`` may set ``app.conf.beat_schedule`` instead)."""
    schedules: list[Any] = [getattr(settings, "CELERY_BEAT_SCHEDULE", None)]
    try:
        from celery import current_app

        schedules.append(current_app.conf.beat_schedule)
    except Exception:  # noqa: S110 - a check must not fail on a Celery app it cannot read
        pass
    tasks: set[str] = set()
    for schedule in schedules:
        if isinstance(schedule, dict):
            tasks.update(str(entry.get("task")) for entry in schedule.values() if isinstance(entry, dict))
    return tasks


@register()
def check_outbox_sweep(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """A sink with an outbox and nothing that sweeps it: facts of a batch below BATCH_SIZE and due retries are never
    sent (a flush is queued only when BATCH_SIZE facts are due)."""
    if not isinstance(getattr(settings, "METERING", {}), dict):
        return []
    from .delivery.sinks.base import SinkNotConfigured, configured_sink_class
    from .schedule import SWEEP_TASK

    try:
        sink_class = configured_sink_class()
    except SinkNotConfigured:
        return []  # xaas_metering.E050 says why
    if sink_class is None or SWEEP_TASK in _scheduled_tasks():
        return []
    return [
        Warning(
            f"The {sink_class.name} sink is configured but no Celery beat entry runs {SWEEP_TASK!r}: facts of a batch "
            "smaller than METERING['BATCH_SIZE'] and retries that are due are never delivered.",
            hint="Add the stack's schedule: `from quotas.schedule import beat_schedule; CELERY_BEAT_SCHEDULE = "
            "beat_schedule()` (README 'Celery in your project'). If another scheduler runs it (django-celery-beat, "
            "cron calling `manage.py metering_flush`), silence this check.",
            id="xaas_metering.W050",
        )
    ]
