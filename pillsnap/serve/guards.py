"""ASGI middleware that acts on a request before the app sees it: a request id with metrics and an access log line
for every request, the API key checked from the headers alone, and the body counted and timed as it streams in.

Plain ASGI rather than FastAPI dependencies: a dependency runs after FastAPI has parsed (and spooled to disk) the
multipart body, which is exactly what an unauthenticated or oversized upload must not get.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pillsnap.serve.auth import KeyChecker
from pillsnap.serve.errors import REQUEST_ID_HEADER, new_request_id, send_error
from pillsnap.serve.metrics import ServeMetrics

LOGGER = logging.getLogger("pillsnap.serve.access")
# Metric labels for the method: any other token a client sends counts as "other", or each would add a series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def log_safe(text: str) -> str:
    """`text` from a client, fit for one log line: every character that is not printable (newline, carriage
    return, ESC and the other C0/C1 controls, Unicode line separators, bidi overrides) and the backslash itself
    are written as Python escapes. Otherwise `/health%0A2026-12-04 INFO ...` would log a second, forged line, and
    an escape sequence would drive the terminal of whoever reads the log."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii") for c in text)


class RequestContextMiddleware:
    """Outermost: gives each request an id (X-Request-ID in and out), counts and times it by route, logs a line."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, route_paths: frozenset[str]) -> None:
        self.app, self.metrics, self.route_paths = app, metrics, route_paths

    def _route(self, scope: Scope) -> str:
        # Label by route template, never by raw path: arbitrary paths would grow the metric without bound.
        route = scope.get("route")
        if route is not None and hasattr(route, "path"):
            return route.path
        return scope["path"] if scope["path"] in self.route_paths else "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = new_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER))
        scope.setdefault("state", {})["request_id"] = rid
        status, start = 500, time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            elapsed, route = time.perf_counter() - start, self._route(scope)
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            LOGGER.info("%s %s %d %.1f ms request_id=%s", log_safe(scope["method"]), log_safe(scope["path"]), status,
                        elapsed * 1000, rid)


class ApiKeyMiddleware:
    """Refuses a request to any non-public path without the right key, from its headers alone: not one byte of
    the body is read, and the connection is closed so that the client stops sending."""

    def __init__(self, app: ASGIApp, checker: KeyChecker, public_paths: frozenset[str]) -> None:
        self.app, self.checker, self.public_paths = app, checker, public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.public_paths \
                and not self.checker.allows(Headers(scope=scope)):
            await send_error(scope, send, 401, "Missing or wrong API key: send it in the X-API-Key header")
            return
        await self.app(scope, receive, send)


class BodyRejected(Exception):
    """Raised into the app's body reading when the body is too large or too slow."""


class _BodyGuard:
    """Wraps `receive`: counts body bytes against `limit` and gives the whole body until `deadline`."""

    def __init__(self, receive: Receive, limit: int, timeout_s: float) -> None:
        self._receive, self.limit, self.timeout_s = receive, limit, timeout_s
        self.deadline = asyncio.get_running_loop().time() + timeout_s
        self.received, self.done = 0, False
        self.rejection: tuple[int, str] | None = None

    def reject(self, status: int, message: str) -> None:
        self.rejection = (status, message)
        raise BodyRejected(message)

    async def receive(self) -> Message:
        if self.rejection:
            raise BodyRejected(self.rejection[1])
        if self.done:  # the body is in; the app may still listen for a disconnect
            return await self._receive()
        remaining = max(0.0, self.deadline - asyncio.get_running_loop().time())
        try:
            message = await asyncio.wait_for(self._receive(), timeout=remaining)
        except asyncio.TimeoutError:
            self.reject(408, f"The upload did not finish within {self.timeout_s:g} s (serving.upload_timeout_s); "
                             f"check the connection and send it again")
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                self.reject(413, _too_large(self.limit))
            self.done = not message.get("more_body", False)
        return message


def _too_large(limit: int) -> str:
    return (f"Request body larger than {limit / 2**20:.2f} MiB; send a smaller photo "
            f"(the limit is serving.max_upload_mb per photo)")


class BodyLimitMiddleware:
    """Enforces the byte limit on the stream itself (a chunked upload has no Content-Length to trust; a declared
    one that is too large is refused at once) and the upload deadline. It answers 413 / 408 itself, replacing
    whatever the app was about to say about the body it could not finish reading."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int], timeout_s: float) -> None:
        self.app, self.limit_for, self.timeout_s = app, limit_for, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await send_error(scope, send, 413, _too_large(limit))
            return
        guard, started = _BodyGuard(receive, limit, self.timeout_s), False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if guard.rejection is None or started:
                started = started or message["type"] == "http.response.start"
                await send(message)

        with contextlib.suppress(BodyRejected):  # raised into the app by guard.receive; answered below
            await self.app(scope, guard.receive, guarded_send)
        if guard.rejection is not None and not started:
            await send_error(scope, send, *guard.rejection)
