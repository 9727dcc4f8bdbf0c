"""API-key authentication with scopes (events:write, recs:read, admin).

Keys and their scopes come from settings.api.keys. With no keys configured auth is off,
which is what the embedded demo runs; production sets RECS_API__KEYS. A key is sent as
`X-API-Key: <key>` or `Authorization: Bearer <key>` and is never logged: only its last
four characters may appear, in `recs config`.
"""

from __future__ import annotations

import hmac

from common.settings import Scope, Settings
from serving.core.errors import ApiError


def key_from_headers(x_api_key: str | None, authorization: str | None) -> str | None:
    if x_api_key:
        return x_api_key.strip()
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def check_scope(settings: Settings, presented: str | None, scope: Scope) -> None:
    """Raise ApiError 401 (no or unknown key) or 403 (key without `scope`); no-op when auth is off."""
    keys = settings.api.keys
    if not keys:
        return
    if not presented:
        raise ApiError(
            401,
            "missing_api_key",
            "send an API key in the X-API-Key header (or Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "ApiKey"},
        )
    # Constant-time comparison against every key, so timing does not reveal a prefix.
    scopes: list[Scope] | None = None
    for key, key_scopes in keys.items():
        if hmac.compare_digest(key.encode(), presented.encode()):
            scopes = key_scopes
    if scopes is None:
        raise ApiError(
            401, "invalid_api_key", "the API key is not recognised", headers={"WWW-Authenticate": "ApiKey"}
        )
    if scope not in scopes:
        raise ApiError(
            403,
            "insufficient_scope",
            f"this route needs the {scope!r} scope; this key has {sorted(scopes)}",
        )
