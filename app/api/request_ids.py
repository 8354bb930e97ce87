"""ASGI middleware giving every HTTP request an id: a sane incoming `X-Request-ID` is kept, else one is generated.
The id is returned in the response header, set for every log line written while handling the request (and for
the Celery tasks it sends), and the request ends with one access log line."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.logging import request_id

HEADER = "X-Request-ID"
# Printable, unambiguous and short, so an id from a client can be logged and echoed as it is.
_SANE = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}")

log = logging.getLogger("unlearnd.access")


def incoming_or_new(scope: Scope) -> str:
    incoming = Headers(scope=scope).get(HEADER)
    if incoming is not None and _SANE.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


class RequestIds:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        current = incoming_or_new(scope)
        token = request_id.set(current)
        started, status = time.perf_counter(), 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[HEADER] = current
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # The path, never the query string or body: those may carry what a person asked to have forgotten.
            method, path = scope["method"], scope["path"]
            duration_ms = round((time.perf_counter() - started) * 1000, 1)
            fields = {"method": method, "path": path, "status": status, "duration_ms": duration_ms}
            log.info("%s %s %s", method, path, status, extra=fields)
            request_id.reset(token)
