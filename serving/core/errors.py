"""One JSON error shape for every failure the API answers: {"error": code, "message": text, ...}."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel


class ErrorBody(BaseModel):
    error: str
    message: str
    errors: list[dict[str, str]] | None = None


class ApiError(Exception):
    """Raised by handlers and dependencies; rendered by `api_error_handler`."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, str]] | None = None,
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


async def validation_error_handler(_: Request, exc: Exception) -> JSONResponse:
    """422 naming each parameter at fault, in the same shape as rejected events."""
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _field_name(tuple(err["loc"])), "reason": str(err["msg"]).removeprefix("Value error, ")}
        for err in exc.errors()
    ]
    names = ", ".join(sorted({e["field"] for e in errors}))
    body = ErrorBody(error="invalid_request", message=f"invalid parameter(s): {names}", errors=errors)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=422)


# For the `responses=` of routes, so OpenAPI documents the error shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or unknown API key."},
    403: {"model": ErrorBody, "description": "The key lacks the scope this route needs."},
    422: {"model": ErrorBody, "description": "A parameter is invalid; `errors` names each one."},
}
