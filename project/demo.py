"""The demo endpoints: the product brief's ``AIService``, guarded by quotas, behind ``POST /demo/completions``.

They act for the tenant of the request's API key (``Authorization: Bearer``; ``X-Tenant-ID`` may narrow it to a
tenant of the key's subtree); without a key they answer 401 and record nothing. ``manage.py seed_demo`` prints a key.

A fake model (no network) answers with the prompt's own words, so a prompt of N words costs N ``llm_tokens``.

``/demo/completions`` is a sync view, because the example project is served over WSGI (``make run``), where an
``async def`` view costs an event loop per request and a thread hop per database call. ``/demo/completions-async``
is the same endpoint through the brief's async service, as an ASGI deployment would serve it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import wraps
from inspect import iscoroutinefunction
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from metering import InvalidUsageEvent, MeteringProtocol, UsageEvent, get_meter
from metering.api.base import length_required, loads_json
from metering.api.errors import ApiError, json_error
from quotas.exceptions import QuotaExceeded
from quotas.handler import QuotaPolicyHandler
from quotas.http import add_quota_headers, error_response, quota_exceeded_response, service_unavailable_response
from quotas.ledger import Decision
from tenants.context import TenantContext
from tenants.exceptions import TenantError
from tenants.middleware import not_authenticated_response, tenant_error_response
from tenants.unavailable import STORE_ERRORS

MAX_PROMPT_CHARS = 20_000


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int


class FakeModel:
    """Echoes the prompt; one token per word."""

    def complete_sync(self, prompt: str) -> Completion:
        words = prompt.split()
        return Completion(text=" ".join(words), tokens=len(words))

    async def complete(self, prompt: str) -> Completion:
        return self.complete_sync(prompt)


class AIService:
    """As in the product brief: call the model, then record what it cost."""

    def __init__(self, meter: MeteringProtocol, model: FakeModel | None = None) -> None:
        self.meter = meter
        self.model = model or FakeModel()

    async def generate(self, tenant: TenantContext, prompt: str) -> Completion:
        completion = await self.model.complete(prompt)
        await self.meter.record_usage(
            UsageEvent(
                tenant_id=tenant.tenant_id,
                feature_name="llm_tokens",
                quantity=completion.tokens,
                timestamp=datetime.now(UTC),
                metadata={"model": "fake-echo", "prompt_chars": len(prompt)},
            )
        )
        return completion


class GuardedAIService(AIService):
    """The demo endpoint's service: reserve the prompt's estimate at every level, then commit the real count.

    Quota is held while the model runs, so concurrent calls cannot together overrun any level; the fact recorded
    is the actual token count, and the difference goes back to every level.
    """

    async def generate_within_quota(self, tenant: TenantContext, prompt: str) -> tuple[Completion, Decision]:
        handler = QuotaPolicyHandler(tenant)
        estimate = len(prompt.split())
        async with await handler.areserve("llm_tokens", estimate) as reservation:
            completion = await self.model.complete(prompt)
            decision = await reservation.acommit(completion.tokens, metadata=self.metadata(prompt))
        return completion, decision

    def generate_within_quota_sync(self, tenant: TenantContext, prompt: str) -> tuple[Completion, Decision]:
        """``generate_within_quota`` for sync views."""
        handler = QuotaPolicyHandler(tenant)
        with handler.reserve("llm_tokens", len(prompt.split())) as reservation:
            completion = self.model.complete_sync(prompt)
            decision = reservation.commit(completion.tokens, metadata=self.metadata(prompt))
        return completion, decision

    @staticmethod
    def metadata(prompt: str) -> dict[str, object]:
        return {"model": "fake-echo", "prompt_chars": len(prompt)}


MAX_BODY_BYTES = 6 * MAX_PROMPT_CHARS + 1024  # room for the longest prompt with every character \u-escaped


def read_json(request: HttpRequest) -> object | JsonResponse:
    """The body parsed as the API parses JSON (``metering.api.base.loads_json``: bounded size and depth, UTF-8, no
    NaN), or the JSON error answer: 411 chunked, 413 too large, 400 ``invalid_json`` naming ``body``."""
    refused = length_required(request.META, request.method)
    if refused is None:
        length = str(request.META.get("CONTENT_LENGTH") or "0")
        if not re.fullmatch(r"[0-9]{1,18}", length) or int(length) > MAX_BODY_BYTES:
            refused = ApiError(413, "payload_too_large", f"the body must be at most {MAX_BODY_BYTES} bytes", "body")
    if refused is None:
        try:
            return loads_json(request.body or b"null", limit=MAX_BODY_BYTES)
        except RequestDataTooBig:  # beyond DATA_UPLOAD_MAX_MEMORY_SIZE, should that be set lower
            refused = ApiError(413, "payload_too_large", "the body is too large", "body")
        except ApiError as error:
            refused = error
    return json_error(refused.status_code, refused.code, refused.message, refused.field)


def post_only(view: Callable[..., Any]) -> Callable[..., Any]:
    """``require_POST`` answering a JSON 405 (with ``Allow``), for sync and async views alike."""

    def refuse(request: HttpRequest) -> JsonResponse:
        response = json_error(405, "method_not_allowed", f"{request.method} is not allowed: use POST")
        response["Allow"] = "POST"
        return response

    if iscoroutinefunction(view):

        @wraps(view)
        async def async_guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            if request.method != "POST":
                return refuse(request)
            return await view(request, *args, **kwargs)

        return async_guarded

    @wraps(view)
    def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        if request.method != "POST":
            return refuse(request)
        return view(request, *args, **kwargs)

    return guarded


def parse_request(request: HttpRequest) -> tuple[TenantContext, str] | JsonResponse:
    """The tenant and the prompt, or the answer saying what is wrong: 401 without a credential (before the body is
    read: an anonymous caller learns nothing, not even how its body would have been judged), else a 4xx naming the
    field."""
    tenant: TenantContext | None = getattr(request, "tenant", None)
    if tenant is None:
        return not_authenticated_response()
    body = read_json(request)
    if isinstance(body, JsonResponse):
        return body
    if not isinstance(body, dict):
        return error_response(400, "invalid_json", "body", "the body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.split():
        return error_response(400, "invalid_prompt", "prompt", "prompt must be a string with at least one word")
    if len(prompt) > MAX_PROMPT_CHARS:
        return error_response(400, "invalid_prompt", "prompt", f"prompt must be at most {MAX_PROMPT_CHARS} characters")
    return tenant, prompt


Answered = QuotaExceeded | InvalidUsageEvent | TenantError
ANSWERED = (QuotaExceeded, InvalidUsageEvent, TenantError)


def answer(outcome: tuple[Completion, Decision] | Answered, seen_by: TenantContext) -> JsonResponse:
    """200 with the completion and the quota headers, or the error's 4xx; ``seen_by`` (the request's tenant) learns
    nothing of the levels above its credential (``quotas.http``)."""
    if isinstance(outcome, QuotaExceeded):
        return quota_exceeded_response(outcome, seen_by=seen_by)
    if isinstance(outcome, InvalidUsageEvent):
        return error_response(400, outcome.code, outcome.field, str(outcome))
    if isinstance(outcome, TenantError):
        return tenant_error_response(outcome)
    completion, decision = outcome
    response = JsonResponse({"text": completion.text, "tokens": completion.tokens})
    return add_quota_headers(response, decision, seen_by=seen_by)  # type: ignore[return-value]


@csrf_exempt
@post_only
def completions(request: HttpRequest) -> JsonResponse:
    parsed = parse_request(request)
    if isinstance(parsed, JsonResponse):
        return parsed
    try:
        outcome: tuple[Completion, Decision] | Answered = GuardedAIService(get_meter()).generate_within_quota_sync(
            *parsed
        )
    except ANSWERED as error:
        outcome = error
    except STORE_ERRORS as error:
        return service_unavailable_response(error, "demo")
    return answer(outcome, parsed[0])


@csrf_exempt
@post_only
async def completions_async(request: HttpRequest) -> JsonResponse:
    parsed = parse_request(request)
    if isinstance(parsed, JsonResponse):
        return parsed
    try:
        outcome: tuple[Completion, Decision] | Answered = await GuardedAIService(get_meter()).generate_within_quota(
            *parsed
        )
    except ANSWERED as error:
        outcome = error
    except STORE_ERRORS as error:
        return service_unavailable_response(error, "demo")
    return answer(outcome, parsed[0])
