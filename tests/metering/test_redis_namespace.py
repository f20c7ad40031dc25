"""One Redis, many sites: every key of a site lives under its namespace (KEY_PREFIX + usage database identity)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from redis.crc import key_slot

from metering import counters
from metering.windows import window
from tenants import namespace
from tenants.lineage import get_context
from tests import services
from tests.conftest import require
from tests.factories import tree

ROOT = Path(__file__).resolve().parent.parent.parent


def hash_tag(key: str) -> str:
    """The part of ``key`` Redis Cluster hashes: the first non-empty ``{...}``, else the whole key."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start != -1 and end > start + 1 else key


def test_namespace_is_the_key_prefix_and_the_usage_database(settings):
    base = namespace.current()
    assert base == namespace.current()  # memoized, stable
    database = connection.settings_dict
    seen = {base.hash}
    for change in ({"NAME": "other-db"}, {"HOST": "db2.internal"}, {"PORT": "6543"}):
        saved = {name: database.get(name) for name in change}
        database.update(change)
        try:
            seen.add(namespace.current().hash)
        finally:
            database.update(saved)
    assert namespace.current() == base
    settings.CACHES = {**settings.CACHES, "default": {**settings.CACHES["default"], "KEY_PREFIX": "site-b"}}
    seen.add(namespace.current().hash)
    assert namespace.current().label == "site-b"
    assert len(seen) == 5  # each input on its own makes a different site


def test_override_replaces_the_identity(settings):
    settings.METERING = {"REDIS_NAMESPACE": "billing-eu"}
    eu = namespace.current()
    assert eu.label == "billing-eu"
    settings.CACHES = {**settings.CACHES, "default": {**settings.CACHES["default"], "KEY_PREFIX": "anything"}}
    assert namespace.current() == eu  # the operator's name wins over KEY_PREFIX and the database
    settings.METERING = {"REDIS_NAMESPACE": "billing-us"}
    assert namespace.current().hash != eu.hash


@pytest.mark.parametrize("key_prefix", ["{evil}", "a}b{c", "{", "}", "x:y*[z]?\\", "", "préfixe {1}"])
def test_a_hostile_key_prefix_never_moves_the_cluster_hash_tag(settings, key_prefix):
    settings.CACHES = {**settings.CACHES, "default": {**settings.CACHES["default"], "KEY_PREFIX": key_prefix}}
    site = namespace.current()
    moment = datetime(2025, 3, 4, 5, 6, tzinfo=UTC)
    keys = counters.keys_for_fact([7, 8, 9], "llm:tokens", moment, epoch=42)
    keys += counters.keys_for_fact([7, 8, 9], "llm:tokens", moment, counters.RESERVED, epoch=42)
    assert {hash_tag(key) for key in keys} == {f"{site.hash}.t7"}
    assert len({key_slot(key.encode()) for key in keys}) == 1  # one tree, one slot: one script may touch it all
    for key in keys:
        prefix = key[: key.index("{")]
        assert not set(prefix) & set("{}*?[]\\"), prefix  # nor a SCAN MATCH glob character
        parsed = counters.parse_key(key)
        assert parsed is not None and parsed[0] == 42 and parsed[3] == "llm:tokens"


def test_keys_and_parsing_are_per_site(settings):
    settings.METERING = {"REDIS_NAMESPACE": "site-a"}
    day = window("day", datetime(2025, 3, 4, tzinfo=UTC))[0]
    key_a = counters.key(1, 1, "calls", "day", day, epoch=0)
    assert counters.parse_key(key_a) is not None
    settings.METERING = {"REDIS_NAMESPACE": "site-b"}
    key_b = counters.key(1, 1, "calls", "day", day, epoch=0)
    assert key_a != key_b
    assert hash_tag(key_a) != hash_tag(key_b)
    assert counters.parse_key(key_a) is None  # another site's counter is not one of ours
    assert counters.parse_key(key_b) is not None
    # Crafted look-alikes: another hash inside our label, the old un-namespaced shape.
    site = namespace.current()
    assert counters.parse_key(key_b.replace(site.hash, "0" * len(site.hash))) is None
    assert counters.parse_key(f"xaas:{{t1}}:e0:u:1:calls:day:{int(day.timestamp())}") is None


@pytest.mark.django_db
def test_scans_and_repairs_see_only_their_own_site(redis_cache, settings):
    tree({"org": None, "k": "org"})
    context = get_context("k")
    root, tenant = context.root.pk, context.tenant.pk
    settings.METERING = {"REDIS_NAMESPACE": "other-site"}
    foreign = counters.key(root, tenant, "calls", "total", None, epoch=0)
    redis_cache.set(foreign, "999")  # another site's counter for the same pks: wrong for this site's database
    settings.METERING = {"REDIS_NAMESPACE": "this-site"}
    assert counters.read(root, tenant, "calls", "total", None, None) is None  # nobody's tree yet: the database
    counters.bump_epochs([root], "default")  # claimed, as this site's first write or decision does
    epoch = counters.current_epoch(root, "default")
    assert epoch != counters.NOT_OURS
    assert counters.read(root, tenant, "calls", "total", None, None) == 0  # not the other site's 999
    assert counters.compare_live(root, repair=True, using="default") == []
    counters.drop_trees([root])
    assert redis_cache.get(foreign) == b"999"  # dropping our tree left the other site's alone
    assert redis_cache.get(counters.key(root, tenant, "calls", "total", None, epoch=epoch)) is None


@pytest.mark.django_db
def test_cached_lineages_are_per_site(redis_cache, settings):
    tree({"org": None, "k": "org"})
    settings.METERING = {"REDIS_NAMESPACE": "site-a"}
    get_context("k")
    with CaptureQueriesContext(connection) as queries:
        get_context("k")
    assert len(queries) == 0  # cached for site a
    settings.METERING = {"REDIS_NAMESPACE": "site-b"}
    with CaptureQueriesContext(connection) as queries:
        get_context("k")
    assert len(queries) == 1  # site b never reads site a's entry
    stored = [key.decode() for key in redis_cache.scan_iter(match="*lineage*")]
    assert len(stored) == 2 and len({key.split(":lineage")[0] for key in stored}) == 2


# ---- two sites, one Redis database, hammered at once from separate OS processes ----


class Site:
    """One ``tests.site_worker serve`` process of a site."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.site_worker"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert "ready" in self._read()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"the site worker exited ({self.process.poll()})"
        return dict(json.loads(line))

    def send(self, *command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(list(command)) + "\n")
        self.process.stdin.flush()

    def ask(self, *command: Any) -> dict[str, Any]:
        self.send(*command)
        return self.answer()

    def answer(self) -> dict[str, Any]:
        answer = self._read()
        assert "exception" not in answer, answer["exception"]
        return answer

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def site_env(tmp: Path, name: str, database_url: str | None, redis_url: str | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in services.ENV.values()}
    env.update(DJANGO_SETTINGS_MODULE="project.settings", VAR_DIR=str(tmp / name), PYTHONPATH=str(ROOT))
    if database_url:
        env["DATABASE_URL"] = database_url
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def migrate(env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"], cwd=ROOT, env=env, check=True, capture_output=True
    )


@pytest.fixture
def postgres_databases() -> Iterator[list[str]]:
    """Two fresh PostgreSQL databases (URLs), dropped afterwards."""
    require("postgres")
    import psycopg

    server = urlparse(services.url("postgres"))
    admin_url = server._replace(path="/postgres").geturl()
    names = [f"xaas_site_{uuid.uuid4().hex[:8]}_{side}" for side in "ab"]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        for name in names:
            admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield [server._replace(path=f"/{name}").geturl() for name in names]
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            for name in names:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


LIMIT_A, USED_BEFORE_A, LIMIT_B = 13, 4, 29
WORKERS_PER_SITE, ATTEMPTS = 2, 40


def hammer_two_sites(tmp: Path, database_urls: list[str | None]) -> None:
    require("redis")
    redis_url = services.url("redis")
    envs = [site_env(tmp, name, url, redis_url) for name, url in zip("ab", database_urls, strict=True)]
    for env in envs:
        migrate(env)
    # Same settings (KEY_PREFIX "example"), same seeding order: same tenant ids and primary keys, epoch 0 in both.
    seeders = [Site(env) for env in envs]
    try:
        pks = [site.ask("seed", limit)["pks"] for site, limit in zip(seeders, (LIMIT_A, LIMIT_B), strict=True)]
        assert pks[0] == pks[1]
        for _ in range(USED_BEFORE_A):
            assert seeders[0].ask("consume", "k1", "calls", 1)["allowed"]
    finally:
        for site in seeders:
            site.close()
    workers = [Site(env) for env in envs for _ in range(WORKERS_PER_SITE)]
    try:
        for worker in workers:  # all four at once
            worker.send("hammer", ["k1", "k2"], "calls", ATTEMPTS)
        results = [worker.answer() for worker in workers]
        audits = [workers[0].ask("audit", "org", "org", "calls"), workers[-1].ask("audit", "org", "org", "calls")]
    finally:
        for worker in workers:
            worker.close()
    admitted = [sum(result["admitted"] for result in results[:WORKERS_PER_SITE])]
    admitted.append(sum(result["admitted"] for result in results[WORKERS_PER_SITE:]))
    assert admitted == [LIMIT_A - USED_BEFORE_A, LIMIT_B]  # each site exactly its own limit, nothing of the other
    for audit, used in zip(audits, (LIMIT_A, LIMIT_B), strict=True):
        assert audit["facts"] == audit["rollups"] == audit["counter"] == used * 10**6
        assert audit["drift"] == []
        assert audit["keys"], "the hammer ran on Redis"
    assert audits[0]["namespace"] != audits[1]["namespace"]
    assert audits[0]["namespace"][0] == audits[1]["namespace"][0] == "example"  # same KEY_PREFIX, other database
    assert not set(audits[0]["keys"]) & set(audits[1]["keys"])
    for audit in audits:
        assert all(f"{{{audit['namespace'][1]}.t" in key for key in audit["keys"])


def test_two_sites_on_one_redis_sqlite(tmp_path):
    hammer_two_sites(tmp_path, [None, None])


def test_two_sites_on_one_redis_postgresql(tmp_path, postgres_databases):
    hammer_two_sites(tmp_path, list(postgres_databases))


OWNER_LIMIT, OWNER_USED_BEFORE = 63, 3


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
@pytest.mark.parametrize("second", ["another-key-prefix", "no-redis"])
def test_one_site_whose_processes_disagree_on_the_namespace_stays_exact(tmp_path, request, second, database):
    """One site (one database), two kinds of processes hammering one limit at once: a rolling deploy that changed
    the cache's ``KEY_PREFIX`` (two namespaces), or a worker configured without Redis. Each kind's counters miss
    the other's facts, so whoever decides must first claim the tree (``counters.counter_owner``): exactly the limit
    is admitted, and the counters left agree with the database."""
    require("redis")
    redis_url = services.url("redis")
    url = request.getfixturevalue("postgres_databases")[0] if database == "postgresql" else None
    first = site_env(tmp_path, "site", url, redis_url) | {"CACHE_KEY_PREFIX": "rel-1"}
    other = site_env(tmp_path, "site", url, None if second == "no-redis" else redis_url)
    other |= {"CACHE_KEY_PREFIX": "rel-2"}
    migrate(first)
    seeder = Site(first)
    try:
        seeder.ask("seed", OWNER_LIMIT)
        for _ in range(OWNER_USED_BEFORE):
            assert seeder.ask("consume", "k1", "calls", 1)["allowed"]
    finally:
        seeder.close()
    workers = [Site(env) for env in (first, other, first, other)]
    try:
        # Within the room: every process of both kinds is admitted each time, taking the tree from the other.
        for worker in workers:
            worker.send("hammer", ["k1", "k2"], "calls", 10)
        assert [worker.answer()["admitted"] for worker in workers] == [10] * 4
        # Then past it, all at once.
        for worker in workers:
            worker.send("hammer", ["k1", "k2"], "calls", ATTEMPTS)
        results = [worker.answer() for worker in workers]
        audit = workers[0].ask("audit", "org", "org", "calls")
    finally:
        for worker in workers:
            worker.close()
    assert sum(result["admitted"] for result in results) == OWNER_LIMIT - OWNER_USED_BEFORE - 40
    assert audit["facts"] == audit["rollups"] == OWNER_LIMIT * 10**6
    assert audit["counter"] in (None, OWNER_LIMIT * 10**6)  # None: the other kind owns the tree now
    assert audit["drift"] == []
