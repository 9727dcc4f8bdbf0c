"""Session tokens: short-lived HMAC-signed credentials a browser holds for its own session.

A storefront's server exchanges its API key for one (POST /v1/tokens) and hands it to the page,
which sends it where a key cannot go: EventSource's query string, a beacon's URL, or a fetch's
Authorization header. A token grants events:write and/or recs:read for the session, device and
(if any) user it names, until it expires. Form: `lrt1.<claims as base64url JSON>.<HMAC-SHA256>`,
signed with `api.token_secret`; the previous secret (a rotation) is still accepted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from common.ids import Id
from common.settings import ApiSettings
from serving.core.errors import ApiError

PREFIX = "lrt1"
MAX_TOKEN_CHARS = 2048  # three ids of 128 characters and two scopes fit in a quarter of it

TokenScope = Literal["events:write", "recs:read"]
TOKEN_SCOPES: tuple[TokenScope, ...] = ("events:write", "recs:read")


class TokenClaims(BaseModel):
    """What a token names and grants; signed as is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    session_id: Id
    anonymous_id: Id
    user_id: Id | None = None
    scopes: tuple[TokenScope, ...] = Field(min_length=1)
    expires_at: int = Field(description="Unix time, seconds.")


def looks_like_token(credential: str) -> bool:
    return credential.startswith(PREFIX + ".")


def issue(api: ApiSettings, claims: TokenClaims) -> str:
    if api.token_secret is None:
        raise ValueError("no token secret configured")
    payload = _b64encode(json.dumps(claims.model_dump(), separators=(",", ":")).encode())
    signed = f"{PREFIX}.{payload}"
    return f"{signed}.{_sign(api.token_secret, signed)}"


def verify(api: ApiSettings, token: str, now: float) -> TokenClaims:
    """The claims of a token signed with the current or previous secret and not expired; else ApiError 401."""
    parts = token.split(".")
    if len(token) > MAX_TOKEN_CHARS or len(parts) != 3 or parts[0] != PREFIX:
        raise _invalid("the session token is malformed")
    signed, signature = f"{parts[0]}.{parts[1]}", parts[2].encode()
    secrets = [s for s in (api.token_secret, api.token_previous_secret) if s is not None]
    # Every secret is compared (a list, not any() over a generator): the time does not tell which matched.
    matches = [hmac.compare_digest(_sign(secret, signed).encode(), signature) for secret in secrets]
    if not any(matches):
        raise _invalid("the session token's signature does not match")
    try:
        claims = TokenClaims.model_validate_json(_b64decode(parts[1]))
    except (ValidationError, ValueError, binascii.Error):
        raise _invalid("the session token's claims are unreadable") from None
    if claims.expires_at <= now:
        raise ApiError(
            401,
            "token_expired",
            "the session token has expired; get a new one",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    if claims.expires_at > now + api.token_ttl_s:  # signed for longer than any token lives now
        raise _invalid("the session token outlives token_ttl_s")
    return claims


def check_person(claims: TokenClaims, user_id: str | None, anonymous_id: str | None, session_id: str | None) -> None:
    """Raise 403 token_scope unless the request is in the token's session, for its device or user."""
    wrong = [
        name
        for name, given, allowed in (
            ("session_id", session_id, claims.session_id),
            ("anonymous_id", anonymous_id, claims.anonymous_id),
            ("user_id", user_id, claims.user_id),
        )
        if given != allowed and not (given is None and name != "session_id")
    ]
    if wrong:
        raise ApiError(
            403,
            "token_scope",
            f"the session token is for another {' and '.join(wrong)}: it covers one session and its person",
        )


def _invalid(message: str) -> ApiError:
    return ApiError(401, "invalid_token", message, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def _sign(secret: SecretStr, signed: str) -> str:
    digest = hmac.new(secret.get_secret_value().encode(), signed.encode(), hashlib.sha256).digest()
    return _b64encode(digest)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
