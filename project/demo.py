"""The demo endpoint: the product brief's ``AIService`` behind ``POST /demo/completions``.

A fake model (no network) answers with the prompt's own words, so a prompt of N words costs N ``llm_tokens``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from metering import InvalidUsageEvent, MeteringProtocol, UsageEvent, get_meter
from quotas.exceptions import QuotaExceeded
from quotas.handler import QuotaPolicyHandler
from quotas.http import add_quota_headers, error_response, quota_exceeded_response
from quotas.ledger import Decision
from tenants.context import TenantContext
from tenants.exceptions import TenantError
from tenants.middleware import tenant_error_response

MAX_PROMPT_CHARS = 20_000


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int


class FakeModel:
    """Echoes the prompt; one token per word."""

    async def complete(self, prompt: str) -> Completion:
        words = prompt.split()
        return Completion(text=" ".join(words), tokens=len(words))


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
            decision = await reservation.acommit(
                completion.tokens, metadata={"model": "fake-echo", "prompt_chars": len(prompt)}
            )
        return completion, decision


@csrf_exempt
@require_POST
async def completions(request: HttpRequest) -> JsonResponse:
    tenant: TenantContext | None = getattr(request, "tenant", None)
    if tenant is None:
        return error_response(400, "missing_tenant", "X-Tenant-ID", "name the tenant in the X-Tenant-ID header")
    try:
        body = json.loads(request.body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error_response(400, "invalid_json", "body", "the body must be a JSON object")
    if not isinstance(body, dict):
        return error_response(400, "invalid_json", "body", "the body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.split():
        return error_response(400, "invalid_prompt", "prompt", "prompt must be a string with at least one word")
    if len(prompt) > MAX_PROMPT_CHARS:
        return error_response(400, "invalid_prompt", "prompt", f"prompt must be at most {MAX_PROMPT_CHARS} characters")
    try:
        completion, decision = await GuardedAIService(get_meter()).generate_within_quota(tenant, prompt)
    except QuotaExceeded as error:
        return quota_exceeded_response(error)
    except InvalidUsageEvent as error:
        return error_response(400, error.code, error.field, str(error))
    except TenantError as error:
        return tenant_error_response(error)
    response = JsonResponse({"text": completion.text, "tokens": completion.tokens})
    return add_quota_headers(response, decision)  # type: ignore[return-value]
