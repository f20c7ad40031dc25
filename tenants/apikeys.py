"""API keys: ``xk_<prefix>_<secret>``, shown once, stored as a SHA-256 hash, revocable, optionally expiring.

Why a single SHA-256 and not a password hash (PBKDF2, bcrypt, argon2): slow hashes exist to make guessing
*low-entropy* secrets expensive. A key's secret is 43 characters drawn uniformly by ``secrets`` from 62 (256
bits of entropy), so guessing is hopeless however fast the hash, and SHA-256's preimage resistance is what
protects a leaked table. A fast hash also keeps the per-request check to microseconds (a password hash would cost
tens of milliseconds on every API call). The ``prefix`` is public (shown in the admin and ``apikey list``); it
finds the row, and the hash of the whole key is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from datetime import datetime, timedelta

from django.db import IntegrityError, transaction
from django.http import HttpRequest
from django.utils import timezone

from .exceptions import InvalidApiKey
from .models import ApiKey, Tenant
from .tree import get_tenant

KEY_PREFIX = "xk"
PREFIX_LENGTH = 8
SECRET_LENGTH = 43  # 43 base62 characters: just over 256 bits
PREFIX_ALPHABET = string.ascii_lowercase + string.digits
SECRET_ALPHABET = string.ascii_letters + string.digits
KEY_RE = re.compile(r"^xk_([a-z0-9]{8,16})_([A-Za-z0-9]{32,128})$")
# last_used_at is a write; refresh it at most this often per key rather than on every request.
LAST_USED_RESOLUTION = timedelta(minutes=1)
_CACHE_ATTRIBUTE = "_xaas_api_key"


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def generate_key() -> tuple[str, str]:
    """A new ``(prefix, plaintext)``."""
    prefix = "".join(secrets.choice(PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH))
    secret = "".join(secrets.choice(SECRET_ALPHABET) for _ in range(SECRET_LENGTH))
    return prefix, f"{KEY_PREFIX}_{prefix}_{secret}"


def create_api_key(
    tenant: Tenant | str,
    *,
    name: str = "",
    expires_at: datetime | None = None,
    expires_in: timedelta | None = None,
) -> tuple[ApiKey, str]:
    """Create a key for ``tenant``; returns the row and the plaintext, which is never available again."""
    tenant_obj = get_tenant(tenant) if isinstance(tenant, str) else tenant
    if expires_in is not None:
        if expires_at is not None:
            raise ValueError("give expires_at or expires_in, not both")
        expires_at = timezone.now() + expires_in
    key = ApiKey(tenant=tenant_obj, name=name, expires_at=expires_at)
    return key, issue(key)


def issue(key: ApiKey) -> str:
    """Give an unsaved ``key`` its prefix and hash and save it; returns the plaintext (the only time it exists)."""
    if key.pk is not None:
        raise ValueError("a saved API key cannot be issued again: create a new one")
    for _ in range(5):
        prefix, plaintext = generate_key()
        key.prefix, key.secret_hash = prefix, hash_key(plaintext)
        try:
            with transaction.atomic():
                key.save(force_insert=True)
        except IntegrityError:  # a prefix collision (1 in 36**8 per existing key): draw again
            key.pk = None
            continue
        return plaintext
    raise RuntimeError("could not draw a unique API key prefix")  # pragma: no cover


def revoke(prefix: str) -> ApiKey:
    """Revoke the key with this prefix (idempotent: an already revoked key keeps its first revocation time)."""
    prefix = prefix.removeprefix(f"{KEY_PREFIX}_").split("_", 1)[0]
    key = ApiKey.objects.select_related("tenant").filter(prefix=prefix).first()
    if key is None:
        raise InvalidApiKey(f"no API key has the prefix {prefix!r}")
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    return key


def authenticate_key(plaintext: str) -> ApiKey:
    """The usable key ``plaintext`` names (with its tenant loaded). Raises ``InvalidApiKey``."""
    match = KEY_RE.match(plaintext)
    if match is None:
        raise InvalidApiKey("malformed API key: expected xk_<prefix>_<secret>")
    key = ApiKey.objects.select_related("tenant").filter(prefix=match.group(1)).first()
    # Compare even when no row matched, so an unknown prefix costs the same as a wrong secret.
    stored = key.secret_hash if key is not None else "0" * 64
    if not hmac.compare_digest(stored, hash_key(plaintext)) or key is None:
        raise InvalidApiKey("unknown API key")
    # Only the holder of the whole key learns why it no longer works.
    if key.revoked_at is not None:
        raise InvalidApiKey("this API key was revoked")
    now = timezone.now()
    if key.is_expired(now):
        raise InvalidApiKey("this API key has expired")
    if key.last_used_at is None or key.last_used_at < now - LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key


def bearer_token(request: HttpRequest) -> str | None:
    """The API key of an ``Authorization: Bearer xk_...`` header; ``None`` without one, with another scheme, or with
    a bearer token that is not one of ours (a host project's JWT or OAuth token: its own views authenticate it, and
    to the quotas it is no credential — a request without a key never acts for a tenant).

    A ``Bearer`` header without a token, or with an ``xk_`` token of the wrong shape, raises ``InvalidApiKey``.
    """
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    if not token or " " in token:
        raise InvalidApiKey("the Authorization header must be 'Bearer <API key>'")
    if not token.startswith(f"{KEY_PREFIX}_"):
        return None
    return token


def key_for_request(request: HttpRequest) -> ApiKey | None:
    """The request's API key, checked once per request (the tenant middleware and DRF share the answer)."""
    token = bearer_token(request)
    if token is None:
        return None
    cached = getattr(request, _CACHE_ATTRIBUTE, None)
    if cached is not None and cached[0] == token:
        key: ApiKey = cached[1]
        return key
    key = authenticate_key(token)
    setattr(request, _CACHE_ATTRIBUTE, (token, key))
    return key
