"""One JSON error shape for every failure the API answers: {"error": code, "message": text, ...}."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.events import FieldError


class ErrorBody(BaseModel):
    """What every error answer holds; some add fields (a rejected batch adds each event's outcome)."""

    error: str = Field(description="A stable code, e.g. missing_api_key, invalid_request, not_found.")
    message: str = Field(description="What went wrong, for a person.")
    errors: list[FieldError] | None = Field(None, description="Each field at fault, when fields are.")


class ApiError(Exception):
    """Raised by handlers and dependencies; rendered by `api_error_handler`."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        headers: dict[str, str] | None = None,
        errors: list[FieldError] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(error=error, message=message, errors=errors)
        self.headers = headers


async def api_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body.model_dump(exclude_none=True), status_code=exc.status, headers=exc.headers)


def _field_name(loc: tuple[Any, ...]) -> str:
    # ("query", "k") -> "k"; ("body", 0, "item_id") -> "0.item_id"
    parts = [str(p) for p in loc if p not in ("query", "path", "body", "header")]
    return ".".join(parts) or "body"


def _field_error(err: dict[str, Any]) -> FieldError:
    if err["type"] == "json_invalid":  # its loc holds a character offset, not a field
        return FieldError(field="body", reason=f"invalid JSON at character {err['loc'][-1]}: {err['ctx']['error']}")
    return FieldError(field=_field_name(tuple(err["loc"])), reason=str(err["msg"]).removeprefix("Value error, "))


async def validation_error_handler(_: Request, exc: Exception) -> JSONResponse:
    """422 naming each parameter at fault, in the same shape as rejected events."""
    assert isinstance(exc, RequestValidationError)
    errors = [_field_error(err) for err in exc.errors()]
    names = ", ".join(sorted({e.field for e in errors}))
    body = ErrorBody(error="invalid_request", message=f"invalid parameter(s): {names}", errors=errors)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=422)


async def http_error_handler(_: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals (no such route, a method the route lacks, a body it cannot decode)."""
    assert isinstance(exc, StarletteHTTPException)
    code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")  # not_found
    body = ErrorBody(error=code, message=str(exc.detail))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=exc.status_code, headers=exc.headers)


async def internal_error_handler(_: Request, exc: Exception) -> JSONResponse:
    """500 in the error shape; the exception itself is logged by the server, never sent."""
    body = ErrorBody(error="internal_error", message="the server failed on this request")
    return JSONResponse(body.model_dump(exclude_none=True), status_code=500)


# For the `responses=` of routes, so OpenAPI documents the error shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or unknown API key."},
    403: {"model": ErrorBody, "description": "The key lacks the scope this route needs."},
    422: {"model": ErrorBody, "description": "A parameter or the body is invalid; `errors` names each one."},
}
# ... and of the routes of one person, which also take a session token.
PERSON_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    401: {
        "model": ErrorBody,
        "description": "Missing or unknown API key (`missing_api_key`, `invalid_api_key`), or a session token "
        "that is forged or malformed (`invalid_token`) or expired (`token_expired`).",
    },
    403: {
        "model": ErrorBody,
        "description": "The key or token lacks the scope this route needs (`insufficient_scope`), or the token "
        "is for another session or person (`token_scope`).",
    },
}
# ... and of routes that take a body.
BODY_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "The body cannot be decoded (it is not UTF-8)."},
    413: {"model": ErrorBody, "description": "The body is larger than `api.max_body_bytes`."},
}
