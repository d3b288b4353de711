"""Job events over Redis pub/sub, and their fan-out to websockets inside one API process.

Workers publish each event on the job's channel `ferry:events:<tenant>:<job id>`, tagged with the
job's sequence number (`jobs.seq`). Each API process holds ONE pattern subscription and one reader
task, and hands events to bounded per-socket queues: a slow socket is dropped, never waited on.
"""

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)

PATTERN = "ferry:events:*"
QUEUE_SIZE = 256
PUBLISH_TIMEOUT = 1.0  # an unreachable Redis must not hold up a submission or a job's COPY


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def channel(tenant: str, job_id: uuid.UUID | str) -> str:
    return f"ferry:events:{tenant}:{job_id}"


def _channel_tenant(name: bytes | str) -> str:
    """The tenant of a `channel()` name that PATTERN matched (job ids have no colon)."""
    text = name.decode() if isinstance(name, bytes) else name
    return text.removeprefix(PATTERN.removesuffix("*")).rpartition(":")[0]


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


Message = tuple[str, str]  # (channel, payload), as PUBLISH takes them


def message(tenant: str, job_id: uuid.UUID, seq: int, frames: list[dict[str, Any]]) -> Message:
    payload = {"tenant": tenant, "job_id": str(job_id), "seq": seq, "frames": frames}
    return channel(tenant, job_id), _json(payload)


def job_message(job: dict[str, Any], public_job: dict[str, Any]) -> Message:
    """The event that announces `job`'s new state (`public_job` as the API shows it)."""
    return message(job["tenant_id"], job["id"], job["seq"], frames_for(public_job))


async def send(redis: Redis, event: Message) -> None:
    """Best effort: a lost event is recovered by clients from the job's state."""
    try:
        async with asyncio.timeout(PUBLISH_TIMEOUT):
            await redis.publish(*event)
    except (RedisError, OSError, TimeoutError) as e:
        log.warning("event_publish_failed", channel=event[0], error=str(e))


async def publish(
    redis: Redis, tenant: str, job_id: uuid.UUID, seq: int, frames: list[dict[str, Any]]
) -> None:
    if frames:
        await send(redis, message(tenant, job_id, seq, frames))


async def publish_job(redis: Redis, job: dict[str, Any], public_job: dict[str, Any]) -> None:
    await send(redis, job_message(job, public_job))


class Frame(dict[str, Any]):
    """A frame as the hub hands it to every socket that sends it: encoded to JSON only once."""

    _text: str | None = None

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = _json(self)
        return self._text


def encode(frame: dict[str, Any]) -> str:
    return frame.text if isinstance(frame, Frame) else _json(frame)


RESYNC: dict[str, Any] = {"resync": True}  # events may have been lost: re-read PostgreSQL
OVERFLOW: dict[str, Any] = {"overflow": True}  # the socket fell behind: drop it

PING_INTERVAL = 5.0  # the reader pings Redis when idle...
SILENCE_LIMIT = 15.0  # ...and reconnects when Redis has said nothing for this long


@dataclass(eq=False)
class Subscription:
    """One socket's bounded queue. The hub never waits on it: when it is full, the socket is
    told to go (OVERFLOW) instead of slowing the reader that serves every other socket."""

    tenant: str
    job_id: str | None
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    overflowed: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, event: dict[str, Any]) -> None:
        if self.overflowed.is_set():
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed.set()  # wakes a socket task that is stuck sending, too
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(OVERFLOW)

    async def get(self) -> dict[str, Any]:
        return await self.queue.get()


class Hub:
    """One Redis pattern subscription per process, fanned out to many subscriptions."""

    def __init__(self, redis_factory: Callable[[], Redis]) -> None:
        self._redis_factory = redis_factory
        self._subs: dict[str, set[Subscription]] = {}  # by tenant
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.connections = 0  # how many times the subscription was (re)established

    @property
    def subscribers(self) -> int:
        return sum(len(subs) for subs in self._subs.values())

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="events-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def subscribe(self, tenant: str, job_id: str | None = None) -> Subscription:
        sub = Subscription(tenant, job_id)
        self._subs.setdefault(tenant, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.tenant)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.tenant]

    def dispatch(self, event: dict[str, Any]) -> None:
        tenant, job_id = event.get("tenant"), event.get("job_id")
        if not isinstance(tenant, str) or not isinstance(event.get("seq"), int):
            log.warning("event_malformed")
            return
        for sub in list(self._subs.get(tenant, ())):
            if sub.job_id in (None, job_id):
                sub.offer(event)

    def _resync_all(self) -> None:
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.offer(RESYNC)

    async def _run(self) -> None:
        delay = 0.1
        while True:
            connections = self.connections
            redis = self._redis_factory()
            pubsub = redis.pubsub()
            try:
                await pubsub.psubscribe(PATTERN)
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # RedisError, OSError, a silent connection...: start over
                log.warning("events_hub_disconnected", error=f"{type(e).__name__}: {e}")
            finally:
                self.connected.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with contextlib.suppress(Exception):
                    await redis.aclose()
            if self.connections > connections:
                delay = 0.1  # it worked for a while: retry soon, then back off
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _read(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        heard = pinged = loop.time()
        while True:
            message = await pubsub.get_message(timeout=min(1.0, PING_INTERVAL))
            now = loop.time()
            if message is not None:
                heard = now
                kind = message.get("type")
                if kind == "pmessage":
                    # Every process hears every tenant's events; most have no socket here.
                    if _channel_tenant(message["channel"]) in self._subs:
                        self._dispatch_raw(message["data"])
                elif kind == "psubscribe":
                    # Subscribed (again): whatever was published before this is lost to us,
                    # so every socket re-reads its jobs from PostgreSQL.
                    self.connections += 1
                    self.connected.set()
                    self._resync_all()
                    log.info("events_hub_subscribed", connections=self.connections)
            if now - heard > SILENCE_LIMIT:
                raise ConnectionError("Redis has been silent; reconnecting")
            if now - pinged > PING_INTERVAL and now - heard > PING_INTERVAL:
                pinged = now
                await pubsub.ping()  # its "pong" message counts as hearing from Redis

    def _dispatch_raw(self, data: bytes | str) -> None:
        try:
            event = orjson.loads(data)
        except ValueError:
            log.warning("event_malformed")
            return
        if isinstance(event, dict):
            frames = event.get("frames")
            if isinstance(frames, list):
                event["frames"] = [Frame(f) for f in frames if isinstance(f, dict)]
            self.dispatch(event)
