"""ASGI middleware that refuses a request body before the app parses it: too large (413), not JSON (415), not
UTF-8 or nested deeper than the limit (400). Each answer has the one error shape."""

from __future__ import annotations

import json
from itertools import accumulate

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import error_body

_QUOTES_AND_BRACKETS = b'"[]{}'
_OTHER_BYTES = bytes(b for b in range(256) if b not in _QUOTES_AND_BRACKETS)
_SQUARE = bytes.maketrans(b"{}", b"[]")  # one kind of bracket: the parser nests as deeply on either
_STEP = {ord("["): 1, ord("]"): -1}
_SLICE = 65536  # bytes per step, so that other threads get the interpreter in between


def nests_deeper_than(body: bytes, limit: int) -> bool:
    """Whether arrays and objects nest deeper than `limit` in `body`, found without parsing it (so without recursion)
    by a state machine (in a string or not) over its bytes, in a few linear passes that each run in C."""
    # Escapes go first: backslash pairs (left to right within a run, as a parser reads them), then escaped quotes.
    # Dropping two adjacent quotes then keeps every other quote's role (opening or closing a string).
    tokens = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(_SQUARE, _OTHER_BYTES).replace(b'""', b"")
    depth, in_string = 0, False
    for start in range(0, len(tokens), _SLICE):
        pieces = tokens[start : start + _SLICE].split(b'"')
        outside = b"".join(pieces[int(in_string) :: 2])  # brackets inside strings do not count
        in_string ^= len(pieces) % 2 == 0
        opens = outside.count(b"[")
        if depth + opens > limit:  # only then can this slice go too deep: follow it bracket by bracket
            levels = list(accumulate(map(_STEP.__getitem__, outside), initial=depth))
            if max(levels) > limit:
                return True
        depth += 2 * opens - len(outside)
    return False


def is_json_media_type(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


class RequestBodyGuard:
    """`form_prefix`: paths whose bodies are HTML forms (the dashboard's), held to the size limit only."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_depth: int, form_prefix: str | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self.form_prefix = form_prefix

    def _too_large(self) -> _Refused:
        return _Refused(
            413, "payload_too_large", f"request body exceeds {self.max_bytes} bytes", {"limit": self.max_bytes}
        )

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        declared = Headers(scope=scope).get("content-length", "")
        # More than 18 digits is too large whatever the limit, and never reaches int()'s digit limit.
        if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > self.max_bytes):
            raise self._too_large()
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b""  # the client went away; the app sees an empty body and nothing is stored
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _check(self, scope: Scope, body: bytes) -> None:
        content_type = Headers(scope=scope).get("content-type", "")
        if not is_json_media_type(content_type):
            expected = {"expected": "application/json"}
            raise _Refused(415, "unsupported_media_type", "request bodies must be application/json", expected)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            position = {"position": exc.start}
            raise _Refused(400, "invalid_utf8", "the request body is not valid UTF-8", position) from None
        if nests_deeper_than(body, self.max_depth):
            raise _Refused(
                400, "json_too_deep", f"JSON nests deeper than {self.max_depth} levels", {"limit": self.max_depth}
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read_body(scope, receive)
            if body and not (self.form_prefix and scope["path"].startswith(self.form_prefix)):
                if len(body) <= _SLICE:
                    self._check(scope, body)  # microseconds: cheaper than a hop to the thread pool
                else:
                    await run_in_threadpool(self._check, scope, body)  # longer body work never blocks the loop
        except _Refused as refused:
            await _send_error(send, refused)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _send_error(send: Send, refused: _Refused) -> None:
    body = json.dumps(error_body(refused.code, refused.message, refused.details)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": refused.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
