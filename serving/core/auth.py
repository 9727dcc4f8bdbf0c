"""API-key authentication with scopes (events:write, recs:read, admin), and session tokens.

Keys and their scopes come from settings.api.keys. With no keys configured auth is off,
which is what the embedded demo runs; production sets RECS_API__KEYS. A key is sent as
`X-API-Key: <key>` or `Authorization: Bearer <key>` and is never logged: only its last
four characters may appear, in `recs config`. The routes of one person (events, their
recommendations and stream) also take a session token (serving/core/tokens.py) in its place.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from typing import get_args

from common.settings import Scope, Settings
from serving.core import tokens
from serving.core.errors import ApiError


@dataclass(frozen=True)
class Grant:
    """Whom a request may act for: anyone (an API key, or auth off) or a session token's person."""

    token: tokens.TokenClaims | None = None

    def check_person(self, user_id: str | None, anonymous_id: str | None, session_id: str | None) -> None:
        """Raise 403 token_scope when a token's request names another session or person."""
        if self.token is not None:
            tokens.check_person(self.token, user_id, anonymous_id, session_id)

    def seconds_left(self, now: float) -> float | None:
        """Until a token expires (never below 0); None for a key, which does not."""
        return None if self.token is None else max(0.0, self.token.expires_at - now)


ANYONE = Grant()


def key_from_headers(x_api_key: str | None, authorization: str | None) -> str | None:
    if x_api_key:
        return x_api_key.strip()
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def check_scope(settings: Settings, presented: str | None, scope: Scope) -> None:
    """Raise ApiError 401 (no or unknown key) or 403 (key without `scope`); no-op when auth is off."""
    if not settings.api.keys:
        return
    scopes = held_scopes(settings, presented)
    if scope not in scopes:
        raise ApiError(
            403,
            "insufficient_scope",
            f"this route needs the {scope!r} scope; this key has {sorted(scopes)}",
        )


def held_scopes(settings: Settings, presented: str | None) -> list[Scope]:
    """The scopes of the presented key, every scope when auth is off; ApiError 401 for no or an unknown key."""
    if not settings.api.keys:
        return list(get_args(Scope))
    if not presented:
        raise ApiError(
            401,
            "missing_api_key",
            "send an API key in the X-API-Key header (or Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "ApiKey"},
        )
    scopes = key_scopes(settings, presented)
    if scopes is None:
        raise ApiError(
            401, "invalid_api_key", "the API key is not recognised", headers={"WWW-Authenticate": "ApiKey"}
        )
    return scopes


def key_scopes(settings: Settings, presented: str) -> list[Scope] | None:
    """The scopes of the configured key `presented` is, or None."""
    # Constant-time comparison against every key, so timing does not reveal a prefix.
    scopes: list[Scope] | None = None
    for key, held in settings.api.keys.items():
        if hmac.compare_digest(key.encode(), presented.encode()):
            scopes = held
    return scopes


def authorize(settings: Settings, presented: str | None, scope: Scope) -> Grant:
    """check_scope, where a session token holding `scope` may stand in for the key."""
    if settings.api.keys and presented and tokens.looks_like_token(presented):
        if key_scopes(settings, presented) is None:  # a key that happens to look like a token stays a key
            claims = tokens.verify(settings.api, presented, time.time())
            if scope not in claims.scopes:
                raise ApiError(
                    403,
                    "insufficient_scope",
                    f"this route needs the {scope!r} scope; this token has {sorted(claims.scopes)}",
                )
            return Grant(claims)
    check_scope(settings, presented, scope)
    return ANYONE
