"""Routes whose requests skip FastAPI's dependency resolution: for the hot GET /v1/recommendations.

FastAPI walks a route's dependency tree on every request and looks each declared parameter up anew,
inspecting its annotation each time. For GET /v1/recommendations (the router's single-value check, the
person's scope with its three security schemes, the query model) that is 24 lookups a request, about half
of the ~300 µs the framework spends on it (measured in one process with the recommender's answer cached).

A PreparedRoute is declared, routed and documented like any APIRoute: the OpenAPI document still comes
from the endpoint's signature. Each request's arguments come instead from the `resolve(request)`
registered for its endpoint (`resolved_by`). That function calls the same dependencies in FastAPI's order,
and has the endpoint's own path and query parameters validated by FastAPI's own function
(`declared_params`), or a query model validated directly (`query_model`); a JSON body is parsed as FastAPI
parses it (`json_body`). A resolver raises NotPrepared for a request it leaves to FastAPI's own resolution
(a body that is not plain JSON of the expected shape): every refusal of such a body stays FastAPI's.
tests/test_serving_prepared.py holds every answer equal to FastAPI's own resolution of the same route. An
endpoint with no resolver is resolved by FastAPI.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import request_params_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

# The request and the route's own Dependant (its declared path and query parameters) -> the endpoint's arguments.
Resolver = Callable[[Request, Dependant], Awaitable[dict[str, Any]]]
Endpoint = TypeVar("Endpoint", bound=Callable[..., Awaitable[Response]])
Model = TypeVar("Model", bound=BaseModel)

_RESOLVERS: dict[Callable[..., Any], Resolver] = {}


class NotPrepared(Exception):
    """Raised by a resolver for a request that FastAPI's own resolution is to answer instead."""


def resolved_by(resolve: Resolver) -> Callable[[Endpoint], Endpoint]:
    """Register `resolve` as what gives this endpoint its arguments under a PreparedRoute. The endpoint
    must return a Response itself (no response model is applied)."""

    def register(endpoint: Endpoint) -> Endpoint:
        _RESOLVERS[endpoint] = resolve
        return endpoint

    return register


class PreparedRoute(APIRoute):
    """An APIRoute whose endpoint's arguments come from its registered resolver (see the module)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        resolve = _RESOLVERS.get(self.endpoint)
        fastapi_handle = self.fastapi_handler()
        if resolve is None:
            return fastapi_handle
        endpoint, dependant = self.endpoint, self.dependant

        async def handle(request: Request) -> Response:
            try:
                arguments = await resolve(request, dependant)
            except NotPrepared:  # Starlette keeps the body read so far: FastAPI reads the same one
                return await fastapi_handle(request)
            response: Response = await endpoint(**arguments)
            return response

        return handle

    def fastapi_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """FastAPI's own handler of this route, resolving its dependencies per request."""
        return super().get_route_handler()


def declared_params(request: Request, dependant: Dependant) -> dict[str, Any]:
    """The endpoint's own path and query parameters (a query model included), validated by FastAPI's own
    function: its values, and its errors in its order (path, then query) as one RequestValidationError."""
    path_values, path_errors = request_params_to_args(dependant.path_params, request.path_params)
    query_values, query_errors = request_params_to_args(dependant.query_params, request.query_params)
    if path_errors or query_errors:
        raise RequestValidationError([*path_errors, *query_errors])
    return {**path_values, **query_values}


def query_model(model: type[Model], request: Request) -> Model:
    """The query parameters as `model` when they are the endpoint's one query model: as `declared_params`
    would give it (the same values, errors located under "query"), without FastAPI's lookup of each field."""
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        errors = [{**error, "loc": ("query", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors) from None


async def json_body(request: Request) -> Any:
    """The body as FastAPI parses a JSON body (`json.loads` of its bytes) when it is declared
    `application/json`. NotPrepared for anything else (no body, no or another content type, bytes that
    are not JSON, a client gone), whose answer is FastAPI's to give. FastAPI parses the body before it
    resolves any dependency, so a resolver calls this first."""
    content_type = request.headers.get("content-type")
    if content_type is None or content_type.partition(";")[0].strip().lower() != "application/json":
        raise NotPrepared
    try:
        return json.loads(await request.body())  # as Starlette's Request.json(), which FastAPI calls
    except Exception:  # ValueError (no body, not JSON, not UTF-8), a disconnect: FastAPI's 422 or 400
        raise NotPrepared from None
