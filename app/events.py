"""Job events over Redis pub/sub, and their fan-out to websockets inside one API process.

Workers publish each event on the job's channel `ferry:events:<tenant>:<job id>`, tagged with the
job's sequence number (`jobs.seq`). Each API process holds ONE pattern subscription and one reader
task, and hands events to bounded per-socket queues: a slow socket is dropped, never waited on.
"""

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)

PATTERN = "ferry:events:*"
QUEUE_SIZE = 256
PUBLISH_TIMEOUT = 1.0  # a Redis outage must not stall a job's COPY


def channel(tenant: str, job_id: uuid.UUID | str) -> str:
    return f"ferry:events:{tenant}:{job_id}"


def frames_for(public_job: dict[str, Any]) -> list[dict[str, Any]]:
    """The frames that announce a job's new state (`public_job` as the API shows it)."""
    frames: list[dict[str, Any]] = [
        {"type": "status", "job_id": public_job["id"], "status": public_job["status"]}
    ]
    if public_job["status"] in ("succeeded", "failed", "cancelled"):
        frames.append({"type": "completed", "job": public_job})
    return frames


def progress_frame(job_id: uuid.UUID, progress: dict[str, Any]) -> dict[str, Any]:
    return {"type": "progress", "job_id": str(job_id), "progress": progress}


async def publish(
    redis: Redis, tenant: str, job_id: uuid.UUID, seq: int, frames: list[dict[str, Any]]
) -> None:
    """Best effort: a lost event is recovered by clients from the job's state."""
    if not frames:
        return
    message = json.dumps(
        {"tenant": tenant, "job_id": str(job_id), "seq": seq, "frames": frames}, default=str
    )
    try:
        await asyncio.wait_for(redis.publish(channel(tenant, job_id), message), PUBLISH_TIMEOUT)
    except (RedisError, OSError, TimeoutError) as e:
        log.warning("event_publish_failed", job_id=str(job_id), error=str(e))


async def publish_job(redis: Redis, job: dict[str, Any], public_job: dict[str, Any]) -> None:
    await publish(redis, job["tenant_id"], job["id"], job["seq"], frames_for(public_job))


RESYNC: dict[str, Any] = {"resync": True}


@dataclass(eq=False)
class Subscription:
    tenant: str
    job_id: str | None
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    overflowed: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, event: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed.set()


class Hub:
    """One Redis pattern subscription per process, fanned out to many subscriptions."""

    def __init__(self, redis_factory: Callable[[], Redis]) -> None:
        self._redis_factory = redis_factory
        self._subs: set[Subscription] = set()
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="events-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def subscribe(self, tenant: str, job_id: str | None = None) -> Subscription:
        sub = Subscription(tenant, job_id)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def dispatch(self, event: dict[str, Any]) -> None:
        for sub in list(self._subs):
            if sub.tenant == event["tenant"] and sub.job_id in (None, event["job_id"]):
                sub.offer(event)

    async def _run(self) -> None:
        delay = 0.1
        while True:
            redis = self._redis_factory()
            pubsub = redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(PATTERN)
                if not self.connected.is_set():
                    self.connected.set()
                    # Events published while we were away are lost: let sockets resync.
                    for sub in list(self._subs):
                        sub.offer(RESYNC)
                delay = 0.1
                async for message in pubsub.listen():
                    if message.get("type") == "pmessage":
                        self._dispatch_raw(message["data"])
            except (RedisError, OSError) as e:
                self.connected.clear()
                log.warning("events_hub_disconnected", error=str(e), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with contextlib.suppress(Exception):
                    await redis.aclose()

    def _dispatch_raw(self, data: bytes | str) -> None:
        try:
            event = json.loads(data)
        except ValueError:
            log.warning("event_malformed")
            return
        self.dispatch(event)
