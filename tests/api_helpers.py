"""Helpers of the REST API tests (importable; the fixtures live in ``tests.api_fixtures``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from django.test import Client

DROP = object()
"""A field value meaning: leave the field out."""


@dataclass
class Api:
    """A JSON client of the API: ``api.get("/api/v1/usage", key="project", feature="llm_tokens")``."""

    keys: dict[str, str]
    client: Client

    def headers(self, key: str | None) -> dict[str, str]:
        if key is None:
            return {}
        return {"Authorization": f"Bearer {self.keys.get(key, key)}"}

    def get(self, path: str, key: str | None = "project", **params: Any) -> Any:
        return self.client.get(path, params, headers=self.headers(key))

    def send(
        self, method: str, path: str, body: Any = None, key: str | None = "project", raw: str | None = None
    ) -> Any:
        data = raw if raw is not None else json.dumps(body)
        call = getattr(self.client, method.lower())
        return call(path, data, content_type="application/json", headers=self.headers(key))

    def post(self, path: str, body: Any = None, key: str | None = "project", **kwargs: Any) -> Any:
        return self.send("post", path, body, key, **kwargs)

    def patch(self, path: str, body: Any = None, key: str | None = "project", **kwargs: Any) -> Any:
        return self.send("patch", path, body, key, **kwargs)

    def put(self, path: str, body: Any = None, key: str | None = "project", **kwargs: Any) -> Any:
        return self.send("put", path, body, key, **kwargs)

    def delete(self, path: str, key: str | None = "project") -> Any:
        return self.client.delete(path, headers=self.headers(key))


def error_of(response: Any) -> dict[str, Any]:
    """The ``error`` object of a JSON error response (and the response is JSON)."""
    assert response["Content-Type"].startswith("application/json"), response.content
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"code", "field", "message"} <= set(body["error"]), body
    error: dict[str, Any] = body["error"]
    return error


def event(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "tenant_id": "acme-chat-key-1",
        "feature_name": "llm_tokens",
        "quantity": "10",
        "transaction_id": "tx-1",
    }
    base.update(fields)
    return {name: value for name, value in base.items() if value is not DROP}
