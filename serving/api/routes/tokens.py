"""POST /v1/tokens: a storefront's server exchanges its API key for a browser's session token."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from fastapi import APIRouter

from common.settings import Scope, Settings
from serving.api.deps import PresentedKey, SettingsDep
from serving.core import tokens
from serving.core.auth import held_scopes
from serving.core.errors import BODY_ERROR_RESPONSES, ERROR_RESPONSES, ApiError, ErrorBody
from serving.schemas import TokenRequest, TokenResponse

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


@router.post(
    "",
    summary="A session token for a browser",
    description=(
        "Authenticated with an API key (never sent to a browser). The token grants, until `expires_at` "
        "(`api.token_ttl_s`), the scopes asked for that the key holds, of `events:write` and `recs:read`, for "
        "the one session and person named: events carrying them, their recommendations and their live stream."
    ),
    response_model=TokenResponse,
    responses={
        **ERROR_RESPONSES,
        **BODY_ERROR_RESPONSES,
        403: {"model": ErrorBody, "description": "The key lacks a scope asked for (or both token scopes)."},
        503: {"model": ErrorBody, "description": "No token secret is configured (`api.token_secret`)."},
    },
)
async def post_token(settings: SettingsDep, presented: PresentedKey, body: TokenRequest) -> TokenResponse:
    return issue_token(settings, held_scopes(settings, presented), body)


def issue_token(settings: Settings, held: list[Scope], body: TokenRequest) -> TokenResponse:
    """A token for `body`'s session and person, with the scopes asked for of those `held` by the key."""
    if settings.api.token_secret is None:
        raise ApiError(503, "tokens_not_configured", "no token secret is configured (RECS_API__TOKEN_SECRET)")
    offered = [s for s in tokens.TOKEN_SCOPES if s in held]
    scopes = body.scopes or offered
    missing = sorted(set(scopes) - set(offered))
    if missing or not scopes:
        raise ApiError(
            403, "insufficient_scope", f"this key cannot grant {missing or list(tokens.TOKEN_SCOPES)}"
        )
    ttl = settings.api.token_ttl_s
    expires_at = int(time.time()) + ttl
    claims = tokens.TokenClaims(
        session_id=body.session_id,
        anonymous_id=body.anonymous_id,
        user_id=body.user_id,
        scopes=tuple(s for s in tokens.TOKEN_SCOPES if s in scopes),
        expires_at=expires_at,
    )
    return TokenResponse(
        token=tokens.issue(settings.api, claims),
        expires_at=datetime.fromtimestamp(expires_at, UTC),
        expires_in=ttl,
        scopes=list(claims.scopes),
    )
