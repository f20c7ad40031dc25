"""URLconf of ``bench/quota_throughput.py``: the demo endpoint next to bench-only views around the same work.

Every bench view does what ``project.demo.completions`` does minus metering and quotas (parse the JSON prompt,
echo its words, answer ``{"text", "tokens"}``), with one kind of enforcement point around it:

- ``/bench/bare``: nothing (sync view);
- ``/bench/bare-async``: nothing, but an ``async def`` view like the demo's (isolates the async dispatch cost);
- ``/demo/completions``: the real demo endpoint (reserve ``llm_tokens`` at every level, commit a durable fact);
- ``/demo/completions-async``: the same through the brief's async service;
- ``/bench/enforce-quota``: ``@enforce_quota("api_calls")`` on the bare view (consume: one fact per request);
- ``/bench/ratelimit``: django-ratelimit on the bare view, counting in the default (django-redis) cache.
"""

from __future__ import annotations

import json

from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from django_ratelimit.decorators import ratelimit  # type: ignore[import-untyped]

from project import demo
from quotas.decorators import enforce_quota


def _error(status: int, code: str, field: str, message: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "field": field, "message": message}}, status=status)


def echo(request: HttpRequest) -> JsonResponse:
    """The demo's request handling and fake model, without the tenant check, metering or quotas."""
    try:
        body = json.loads(request.body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(400, "invalid_json", "body", "the body must be a JSON object")
    if not isinstance(body, dict):
        return _error(400, "invalid_json", "body", "the body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.split():
        return _error(400, "invalid_prompt", "prompt", "prompt must be a string with at least one word")
    if len(prompt) > demo.MAX_PROMPT_CHARS:
        return _error(400, "invalid_prompt", "prompt", f"prompt must be at most {demo.MAX_PROMPT_CHARS} characters")
    words = prompt.split()
    return JsonResponse({"text": " ".join(words), "tokens": len(words)})


@csrf_exempt
@require_POST
def bare(request: HttpRequest) -> JsonResponse:
    return echo(request)


@csrf_exempt
@require_POST
async def bare_async(request: HttpRequest) -> JsonResponse:
    return echo(request)


@csrf_exempt
@require_POST
@enforce_quota("api_calls")
def enforced_api_calls(request: HttpRequest) -> JsonResponse:
    return echo(request)


@csrf_exempt
@require_POST
@ratelimit(key="header:x-tenant-id", rate="1000000/m", method="POST", block=True)
def ratelimited(request: HttpRequest) -> JsonResponse:
    return echo(request)


urlpatterns = [
    path("bench/bare", bare, name="bench-bare"),
    path("bench/bare-async", bare_async, name="bench-bare-async"),
    path("demo/completions", demo.completions, name="demo-completions"),
    path("demo/completions-async", demo.completions_async, name="demo-completions-async"),
    path("bench/enforce-quota", enforced_api_calls, name="bench-enforce-quota"),
    path("bench/ratelimit", ratelimited, name="bench-ratelimit"),
]
