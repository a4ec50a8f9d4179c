"""Server-wide limits that no single request's limit gives: a budget of upload bytes in flight (what bounds the
memory and temp disk that uploads hold, however many arrive at once) and a deadline on the request headers.

The byte budget is plain ASGI, inside the auth and size guards: a request is counted only once it is known to be
allowed and not oversized. The header deadline lives in the HTTP protocol, since no ASGI code runs before the
headers are complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pillsnap.serve.errors import send_error
from pillsnap.serve.metrics import ServeMetrics
from pillsnap.serve.settings import ServeSettings

LOGGER = logging.getLogger(__name__)
BUDGET_RETRY_AFTER_S = 2


class UploadBudget:
    """Bytes of request bodies held right now, against one limit. Touched only on the event loop: no lock."""

    def __init__(self, limit: int, metrics: ServeMetrics | None = None) -> None:
        self.limit, self.held, self._metrics = limit, 0, metrics

    def take(self, size: int) -> bool:
        """Reserve `size` bytes; False (and nothing reserved) when that would pass the limit."""
        if self.held + size > self.limit:
            return False
        self._set(self.held + size)
        return True

    def give_back(self, size: int) -> None:
        self._set(self.held - size)

    def refused(self) -> None:
        if self._metrics is not None:
            self._metrics.budget_refusals.inc()

    def _set(self, value: int) -> None:
        self.held = value
        if self._metrics is not None:
            self._metrics.upload_bytes.set(value)


class OverBudget(Exception):
    """Raised into the app's body reading when a streamed (chunked) body would pass the budget."""


class UploadBudgetMiddleware:
    """Reserves each body against the budget before the app reads it: the declared Content-Length at once, a
    chunked body as it streams in. What does not fit gets 503 with Retry-After (naming the setting), and the
    reservation is given back when the request ends, whatever happened to it."""

    def __init__(self, app: ASGIApp, budget: UploadBudget) -> None:
        self.app, self.budget = app, budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        held = int(declared) if declared.isdigit() else 0
        if not self.budget.take(held):
            self.budget.refused()
            return await send_busy(scope, send, self._message())
        started, refused = False, False

        async def counted_receive() -> Message:
            nonlocal held, refused
            message = await receive()
            if message["type"] == "http.request" and not declared.isdigit():
                size = len(message.get("body", b""))
                if not self.budget.take(size):
                    refused = True
                    raise OverBudget(self._message())
                held += size
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if not refused or started:
                started = started or message["type"] == "http.response.start"
                await send(message)

        try:
            with contextlib.suppress(OverBudget):
                await self.app(scope, counted_receive, guarded_send)
            if refused and not started:
                self.budget.refused()
                await send_busy(scope, send, self._message())
        finally:
            self.budget.give_back(held)

    def _message(self) -> str:
        return (f"The server holds {self.budget.limit / 2**20:g} MiB of uploads at most "
                f"(serving.max_inflight_upload_mb) and that is taken now; retry shortly")


async def send_busy(scope: Scope, send: Send, message: str) -> None:
    """503 upload_budget with Retry-After, straight from middleware; the connection is closed, since the body the
    client may still be sending is never read."""
    await send_error(scope, send, 503, message, "upload_budget", [(b"retry-after", str(BUDGET_RETRY_AFTER_S).encode())])


def header_timeout_protocol(timeout_s: float) -> type:
    """uvicorn's httptools protocol with a deadline on the request line and headers: a connection that has not
    sent complete headers within `timeout_s` of opening (or of starting its next request) is closed. uvicorn
    itself times out only idle keep-alive connections, so a client trickling headers would hold its socket for
    ever (slowloris)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            self._arm()  # the next request on a kept-alive connection gets its own deadline
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                LOGGER.debug("closed a connection from %s: no complete headers within %g s (serving."
                            "header_timeout_s)", self.client, timeout_s)
                self.transport.close()

    return HeaderTimeoutProtocol


def uvicorn_limits(settings: ServeSettings) -> dict:
    """The uvicorn.Config / uvicorn.run keywords that apply the connection-level `serving.*` settings. Past
    max_connections uvicorn answers 503 (plain text) to each new request until connections close."""
    return {"http": header_timeout_protocol(settings.header_timeout_s), "limit_concurrency": settings.max_connections,
            "timeout_keep_alive": settings.keep_alive_s}
