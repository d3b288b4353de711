"""ASGI middleware: a request id on every log line, one access line per request (with no query
string, so `?token=` never reaches a log), request metrics by route template, and a cap on
request bodies that are not uploads."""

import time
import uuid

import structlog
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.api.problems import problem

log = structlog.get_logger("ferry.access")


def _route(scope: Scope) -> str:
    """The matched route's template (`/jobs/{job_id}`), so that label values stay few."""
    route = scope.get("route")
    return str(getattr(route, "path", "unmatched"))


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["type"] == "http":
                elapsed = time.perf_counter() - started
                route = _route(scope)
                metrics.REQUESTS.labels(scope["method"], route, str(status)).inc()
                metrics.REQUEST_SECONDS.labels(scope["method"], route).observe(elapsed)
                log.info(
                    "request",
                    method=scope["method"],
                    path=scope["path"],
                    status=status,
                    ms=round(elapsed * 1000, 1),
                )


MAX_BODY_BYTES = 1024 * 1024


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class BodyLimit:
    """Caps every request body but a multipart upload at `max_bytes` (413 `upload_too_large`).

    A JSON request is a few KiB; without a cap a client could make the API read gigabytes into
    memory before validation refuses them. Multipart uploads stream to S3 and count their own
    bytes against `FERRY_MAX_UPLOAD_BYTES`.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type = (_header(scope, b"content-type") or "").lower()
        if scope["type"] != "http" or content_type.startswith("multipart/form-data"):
            await self.app(scope, receive, send)
            return
        detail = f"The request body is over {self.max_bytes} bytes."
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = problem(413, "Content Too Large", detail, "upload_too_large")
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised while FastAPI reads the body: answered by app.api.problems.
                    raise HTTPException(413, detail)
            return message

        await self.app(scope, limited, send)
