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


def _error(status: int, code: str, field: str, message: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "field": field, "message": message}}, status=status)


@csrf_exempt
@require_POST
async def completions(request: HttpRequest) -> JsonResponse:
    tenant: TenantContext | None = getattr(request, "tenant", None)
    if tenant is None:
        return _error(400, "missing_tenant", "X-Tenant-ID", "name the tenant in the X-Tenant-ID header")
    try:
        body = json.loads(request.body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(400, "invalid_json", "body", "the body must be a JSON object")
    if not isinstance(body, dict):
        return _error(400, "invalid_json", "body", "the body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.split():
        return _error(400, "invalid_prompt", "prompt", "prompt must be a string with at least one word")
    if len(prompt) > MAX_PROMPT_CHARS:
        return _error(400, "invalid_prompt", "prompt", f"prompt must be at most {MAX_PROMPT_CHARS} characters")
    try:
        completion = await AIService(get_meter()).generate(tenant, prompt)
    except InvalidUsageEvent as error:
        return _error(400, error.code, error.field, str(error))
    except TenantError as error:
        return tenant_error_response(error)
    return JsonResponse({"text": completion.text, "tokens": completion.tokens})
