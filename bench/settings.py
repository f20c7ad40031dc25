"""Settings of the benchmark server (``bench/quota_concurrency.py``): the example project, with the bench URLs."""

from project.settings import *  # noqa: F403

ROOT_URLCONF = "bench.bench_urls"
RATELIMIT_USE_CACHE = "default"

# The load driver plays a trusted gateway that names the tenant (X-Tenant-ID), as in the runs this bench was built for:
# the API-key path adds one key lookup per request (bench/quota_throughput.py measures both).
METERING = {**METERING, "TENANT_RESOLVER": "tenants.resolvers.header_resolver", "TRUST_TENANT_HEADER": True}  # noqa: F405
