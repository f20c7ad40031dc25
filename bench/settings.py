"""Settings of the benchmark server (``bench/quota_concurrency.py``): the example project, with the bench URLs."""

from project.settings import *  # noqa: F403

ROOT_URLCONF = "bench.bench_urls"
RATELIMIT_USE_CACHE = "default"
