"""What one request may cost the server: its body's size (ASGI middleware), its head's size and time (uvicorn protocol).
The protocol also stamps when each request's parsing began: how long it then waits is serving/core/load.py's.

The body limit runs before routing, so before FastAPI reads and parses a body and before the
API key is checked. uvicorn bounds neither a request head's size nor the time it takes to
arrive (`timeout_keep_alive` covers only idle time between requests), so the protocol below does.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any, cast

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from common.settings import ApiSettings
from serving.core.errors import ErrorBody
from serving.core.load import ARRIVED_AT


def body_too_large(max_bytes: int) -> ErrorBody:
    return ErrorBody(
        error="body_too_large",
        message=f"the request body exceeds {max_bytes} bytes (api.max_body_bytes)",
    )


class BodySizeLimit:
    """Answer 413 to a body over `max_bytes`: at once when Content-Length says so, else when the
    bytes received pass it (a chunked body), without waiting for the rest."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0
        refused = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not started:
                    refused = True
                    await self._refuse(scope, receive, send)
                    # The app sees a client that went away, and stops reading.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:  # the app's own answer to the "disconnect" goes nowhere: ours was sent
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, guarded_send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = body_too_large(self.max_bytes).model_dump(exclude_none=True)
        # Connection: close, so uvicorn closes rather than read the rest of the body as a next request.
        await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head over the limit."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a request head limited in bytes and in time.

    The time runs from the connection's opening, or from the end of the previous response, to
    the end of the head: a client that sends nothing, or a head byte by byte, is disconnected.
    """

    def __init__(self, *args: Any, head_timeout_s: float, max_head_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout_s = head_timeout_s
        self.max_head_bytes = max_head_bytes
        self.head_bytes = 0
        self.head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_bytes = 0
        cast(dict[str, Any], self.scope)[ARRIVED_AT] = time.monotonic()  # the request's wait counts from here

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm_head_deadline()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Unless the next head is already in (pipelined), it has the same time to arrive.
        if self.cycle.response_complete and not self.transport.is_closing():
            self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a head the parser refused; ours when it was refused for its size."""
        if self.head_bytes <= self.max_head_bytes:
            super().send_400_response(msg)
            return
        body = ErrorBody(
            error="head_too_large",
            message=f"the request line and headers exceed {self.max_head_bytes} bytes (api.max_head_bytes)",
        ).model_dump_json(exclude_none=True)
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body.encode())
        )
        self.transport.close()

    def _count_head(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > self.max_head_bytes:
            raise HeadTooLarge  # httptools stops; data_received answers through send_400_response

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self.head_deadline = self.loop.call_later(self.head_timeout_s, self.transport.close)

    def _disarm_head_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None


def uvicorn_limits(api: ApiSettings) -> dict[str, Any]:
    """The keyword arguments of `uvicorn.run`/`uvicorn.Config` that bound a connection."""
    # A partial of a module-level class, so it pickles into `--workers N`'s spawned processes.
    protocol = partial(
        BoundedHttpToolsProtocol, head_timeout_s=api.head_timeout_s, max_head_bytes=api.max_head_bytes
    )
    return {"http": cast(type[asyncio.Protocol], protocol), "timeout_keep_alive": api.keep_alive_s}
