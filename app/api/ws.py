"""Websockets: `/ws/jobs/{id}` follows one job, `/ws/jobs` all of the caller's jobs (SPEC §4).

Thin on purpose: authenticate, subscribe through the process's hub, and forward what the stream
(app.live) makes of each event. One task reads the client and the queue together.
"""

import asyncio
import contextlib
import uuid
from typing import Any, Protocol

import structlog
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from app import auth, events, live, metrics
from app.events import Hub
from app.services import Services

log = structlog.get_logger(__name__)

router = APIRouter()

UNAUTHORIZED = 4401
NOT_FOUND = 4404
INTERNAL_ERROR = 1011  # e.g. PostgreSQL unreachable: reconnect later
TRY_AGAIN_LATER = 1013  # the client fell too far behind and was dropped: reconnect
SEND_TIMEOUT = 10.0  # a client that takes longer than this to take one frame is dropped
CLOSE_TIMEOUT = 2.0


class Stream(Protocol):
    finished: bool

    async def handle(self, event: dict[str, Any]) -> list[live.Frame]: ...


class _Dropped(Exception):
    pass


async def _tenant(ws: WebSocket, services: Services) -> str | None:
    key = auth.bearer_token(ws.headers.get("authorization")) or ws.query_params.get("token")
    if not key:
        return None
    return await services.keys.tenant(key)


async def _send(ws: WebSocket, frames: list[live.Frame]) -> None:
    for frame in frames:
        await ws.send_text(events.encode(frame))  # hub frames are encoded once for all sockets


async def _forward(ws: WebSocket, frames: list[live.Frame], dropped: asyncio.Task[Any]) -> None:
    """Send, unless the client stops taking frames: its queue overflows meanwhile, or one
    event's frames take longer than SEND_TIMEOUT (the send blocks while TCP buffers are full)."""
    if not frames:
        return
    sender = asyncio.create_task(_send(ws, frames))
    done, _ = await asyncio.wait(
        {sender, dropped}, timeout=SEND_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
    )
    if sender in done:
        sender.result()
        return
    sender.cancel()
    with contextlib.suppress(BaseException):
        await sender
    raise _Dropped


async def _close(ws: WebSocket, code: int, reason: str = "") -> None:
    if ws.application_state == WebSocketState.CONNECTED:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(code, reason), CLOSE_TIMEOUT)


async def _pump(ws: WebSocket, sub: events.Subscription, stream: Stream) -> None:
    """Forward the stream until it ends, the client leaves, or the client falls behind."""
    receiver: asyncio.Task[Any] = asyncio.create_task(ws.receive())
    getter: asyncio.Task[dict[str, Any]] = asyncio.create_task(sub.get())
    dropped: asyncio.Task[Any] = asyncio.create_task(sub.overflowed.wait())
    try:
        while True:
            done, _ = await asyncio.wait(
                {receiver, getter, dropped}, return_when=asyncio.FIRST_COMPLETED
            )
            if dropped in done:
                raise _Dropped
            if receiver in done:
                if receiver.result()["type"] == "websocket.disconnect":
                    return
                receiver = asyncio.create_task(ws.receive())  # clients have nothing to say
            if getter in done:
                event = getter.result()
                if event is events.OVERFLOW:
                    raise _Dropped
                await _forward(ws, await stream.handle(event), dropped)
                if stream.finished:
                    await _close(ws, 1000)
                    return
                getter = asyncio.create_task(sub.get())
    finally:
        for task in (receiver, getter, dropped):
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


async def _serve(ws: WebSocket, job_id: str | None) -> None:
    services: Services = ws.app.state.services
    hub: Hub = ws.app.state.hub
    await ws.accept()
    metrics.OPEN_WEBSOCKETS.inc()
    sub: events.Subscription | None = None
    try:
        tenant = await _tenant(ws, services)
        if tenant is None:
            await _close(ws, UNAUTHORIZED, "A valid API key is required.")
            return
        stream: live.JobStream | live.TenantStream
        if job_id is None:
            sub = hub.subscribe(tenant)
            stream = live.TenantStream(services, tenant)
        else:
            try:
                parsed = uuid.UUID(job_id)
            except ValueError:
                await _close(ws, NOT_FOUND, "No such job.")
                return
            sub = hub.subscribe(tenant, str(parsed))
            stream = live.JobStream(services, tenant, parsed)
        first = await stream.open()  # after subscribing: no event falls in between
        if first is None:
            await _close(ws, NOT_FOUND, "No such job.")
            return
        await _send(ws, first)
        if stream.finished:
            await _close(ws, 1000)
            return
        await _pump(ws, sub, stream)
    except _Dropped:
        log.info("websocket_dropped", reason="slow_consumer")
        await _close(ws, TRY_AGAIN_LATER, "Too slow to keep up; reconnect.")
    except WebSocketDisconnect:
        pass
    except Exception:
        log.exception("websocket_failed")
        await _close(ws, INTERNAL_ERROR, "Internal error; reconnect.")
    finally:
        if sub is not None:
            hub.unsubscribe(sub)
        metrics.OPEN_WEBSOCKETS.dec()


@router.websocket("/ws/jobs/{job_id}")
async def follow_job(ws: WebSocket, job_id: str) -> None:
    await _serve(ws, job_id)


@router.websocket("/ws/jobs")
async def follow_jobs(ws: WebSocket) -> None:
    await _serve(ws, None)
