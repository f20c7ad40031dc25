"""The REST API (Django REST framework) under ``/api/v1/``: events, usage, quotas and entitlements.

Routes: ``metering.api.urls``. Authentication: API keys (``tenants.authentication``). Errors: ``metering.api.errors``.
"""
