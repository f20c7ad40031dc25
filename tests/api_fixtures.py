"""Fixtures of the REST API tests. Test modules load them with ``pytest_plugins = ["tests.api_fixtures"]``.

The tree (``forest``)::

    acme                      (key: "org")
    ├── acme-chat             (keys: "project", "revoked", "expired")
    │   ├── acme-chat-key-1   (key: "child")
    │   └── acme-chat-key-2
    └── acme-search           (key: "sibling")
        └── acme-search-key-1
    other                     (key: "unrelated")
    └── other-project
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from tenants.apikeys import create_api_key, revoke
from tests.api_helpers import Api
from tests.factories import FOREST, tree


@pytest.fixture
def forest(db: None) -> dict[str, Any]:
    return tree(FOREST)


@pytest.fixture
def keys(forest: dict[str, Any]) -> dict[str, str]:
    """Plaintext keys by role (see the module docstring)."""
    made = {
        "org": create_api_key("acme", name="org")[1],
        "project": create_api_key("acme-chat", name="project")[1],
        "child": create_api_key("acme-chat-key-1", name="child")[1],
        "sibling": create_api_key("acme-search", name="sibling")[1],
        "unrelated": create_api_key("other", name="unrelated")[1],
        "revoked": create_api_key("acme-chat", name="revoked")[1],
        "expired": create_api_key("acme-chat", expires_at=timezone.now() - timedelta(seconds=1))[1],
    }
    revoke(made["revoked"])
    return made


@pytest.fixture
def api(keys: dict[str, str]) -> Api:
    return Api(keys=keys, client=Client())
