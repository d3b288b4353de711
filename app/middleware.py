"""ASGI middleware: a request id on every log line, one access line per request (with no query
string, so `?token=` never reaches a log), and request metrics by route template."""

import time
import uuid

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics

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
