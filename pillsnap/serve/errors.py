"""Every error the API answers is JSON: {"detail": what went wrong and what to do, "error": a stable code,
"request_id": the id also sent as X-Request-ID and logged}. Clients never see a traceback."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope, Send

from pillsnap.utils.images import ImageError, ImageTooLarge, ImageTooSmall

LOGGER = logging.getLogger(__name__)
REQUEST_ID_HEADER = "x-request-id"
CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
         408: "upload_timeout", 413: "too_large", 422: "invalid_request", 503: "busy", 500: "internal_error"}


class ServerBusy(Exception):
    """Every prediction slot is taken; the client should retry shortly."""


class RequestRejected(Exception):
    """A request refused by the service with an HTTP status (e.g. an empty upload)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def image_error_status(err: ImageError) -> tuple[int, str]:
    """HTTP status and code of an image the decoder refused."""
    if isinstance(err, ImageTooLarge):
        return 413, "image_too_large"
    if isinstance(err, ImageTooSmall):
        return 422, "image_too_small"
    return 400, "image_unreadable"


def new_request_id(incoming: str | None = None) -> str:
    """The caller's X-Request-ID when it is a short plain token, [A-Za-z0-9._-]{1,64} (so logs can be joined),
    else a fresh one. ASCII only: str.isalnum also passes letters of every script, which a header would mangle."""
    if incoming and len(incoming) <= 64 and incoming.isascii() and all(c.isalnum() or c in "-_." for c in incoming):
        return incoming
    return uuid.uuid4().hex


def request_id_of(scope: Scope) -> str:
    return (scope.get("state") or {}).get("request_id") or "-"


def error_body(status: int, message: str, request_id: str, code: str | None = None) -> dict:
    return {"detail": message, "error": code or CODES.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_")),
            "request_id": request_id}


def error_response(request: Request, status: int, message: str, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    rid = request_id_of(request.scope)
    return JSONResponse(error_body(status, message, rid, code), status_code=status, headers=headers)


async def send_error(scope: Scope, send: Send, status: int, message: str, code: str | None = None,
                     extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Answer straight from ASGI middleware (before the app has read anything)."""
    body = json.dumps(error_body(status, message, request_id_of(scope), code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra_headers, (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _validation_message(err: RequestValidationError) -> str:
    # Field locations and messages only: echoing the submitted values would reflect junk back to the client.
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'request'}: {e.get('msg', 'invalid')}"
             for e in err.errors()]
    return "; ".join(parts) or "Invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Turn every exception into the JSON error shape; unexpected ones are logged with their traceback."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(request, err.status_code, str(err.detail), headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(request, 422, _validation_message(err))

    @app.exception_handler(ImageError)
    async def image_error(request: Request, err: ImageError) -> JSONResponse:
        status, code = image_error_status(err)
        return error_response(request, status, str(err), code)

    @app.exception_handler(RequestRejected)
    async def rejected(request: Request, err: RequestRejected) -> JSONResponse:
        return error_response(request, err.status, err.message, err.code)

    @app.exception_handler(ServerBusy)
    async def busy(request: Request, err: ServerBusy) -> JSONResponse:
        return error_response(request, 503, str(err), headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        rid = request_id_of(request.scope)
        LOGGER.error("request %s failed: %s", rid, type(err).__name__, exc_info=err)
        return error_response(request, 500, f"Internal error; the server log has the details under request id {rid}")
