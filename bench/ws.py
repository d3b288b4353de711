"""Websockets: completion latency (job finished -> `completed` frame at the client) beside Redis
pub/sub's own latency, and how many concurrent subscribers one API process holds.

The route `/ws/jobs/{id}?token=KEY` is in the SPEC (§4); when the API under test has no such route
(the handshake is refused) the figures are skipped with a clear line.
"""

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import redis.asyncio as aredis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from bench.measure import Figure, Skipped, percentile
from bench.memory import TINY
from bench.stack import TENANT, Stack, log

FAR = "2100-01-01T00:00:00Z"
SPACING = 0.25  # seconds between the measured jobs' start: more than a one-row export takes


def _ws_url(api: str, job_id: str, key: str) -> str:
    return api.replace("http://", "ws://") + f"/ws/jobs/{job_id}?token={key}"


async def _submit(client: httpx.AsyncClient, run_at: str) -> str:
    response = await client.post("/exports", json={**TINY, "run_at": run_at})
    response.raise_for_status()
    job_id: str = response.json()["id"]
    return job_id


async def _available(api: str, client: httpx.AsyncClient, key: str) -> str | None:
    job_id = await _submit(client, FAR)
    try:
        async with connect(_ws_url(api, job_id, key), open_timeout=10) as ws:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if frame.get("type") != "snapshot":
                return f"first frame is {frame.get('type')!r}, not a snapshot"
    except InvalidStatus as e:
        return f"/ws/jobs/{{id}} refused the handshake: HTTP {e.response.status_code}"
    finally:
        await client.post(f"/jobs/{job_id}/cancel")
    return None


async def _completion(
    api: str, client: httpx.AsyncClient, key: str, delay: float = 0.0
) -> float | None:
    """ms from the job's finished_at to the `completed` frame's arrival (None: finished early).
    The job runs `delay` seconds after the others' common start."""
    run_at = (datetime.now(UTC) + timedelta(seconds=2 + delay)).isoformat()
    job_id = await _submit(client, run_at)
    async with connect(_ws_url(api, job_id, key), open_timeout=10) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if first["job"]["status"] != "queued":
            return None
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if frame["type"] == "completed":
                arrived = time.time()
                finished = datetime.fromisoformat(frame["job"]["finished_at"]).timestamp()
                return (arrived - finished) * 1000


async def _pubsub_latency(redis_url: str, samples: int) -> list[float]:
    """The reference: publish -> receive on the same Redis, one pattern subscription."""
    sub = aredis.Redis.from_url(redis_url)
    pub = aredis.Redis.from_url(redis_url)
    pubsub = sub.pubsub(ignore_subscribe_messages=True)
    await pubsub.psubscribe("bench:events:*")
    latencies: list[float] = []
    try:
        for i in range(samples):
            await pub.publish(f"bench:events:{i}", json.dumps({"t": time.time()}))
            while True:
                message = await pubsub.get_message(timeout=5)
                if message and message["type"] == "pmessage":
                    latencies.append((time.time() - json.loads(message["data"])["t"]) * 1000)
                    break
            await asyncio.sleep(0.05)
    finally:
        await pubsub.aclose()
        await sub.aclose()
        await pub.aclose()
    return latencies


async def _hold(api: str, client: httpx.AsyncClient, key: str, target: int) -> dict[str, Any]:
    """Open up to `target` subscribers of one queued job, then cancel it: how many get
    `completed` and a 1000 close, and how long the fan-out takes."""
    job_id = await _submit(client, FAR)
    url = _ws_url(api, job_id, key)
    sockets: list[Any] = []
    failures = 0
    batch = 100
    while len(sockets) < target and failures == 0:

        async def one() -> Any:
            ws = await connect(url, open_timeout=20, ping_interval=None, max_queue=64)
            frame = json.loads(await asyncio.wait_for(ws.recv(), 20))
            assert frame["type"] == "snapshot"
            return ws

        results = await asyncio.gather(
            *(one() for _ in range(min(batch, target - len(sockets)))), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                failures += 1
            else:
                sockets.append(result)
    log(f"ws: {len(sockets)} subscribers open ({failures} refused); cancelling the job")
    arrivals: list[float] = []

    async def completed(ws: Any) -> bool:
        try:
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if frame["type"] == "completed":
                    arrivals.append(time.perf_counter())
                    await asyncio.wait_for(ws.wait_closed(), 10)
                    return bool(ws.close_code == 1000)
        except Exception:
            return False

    waiting = [asyncio.create_task(completed(ws)) for ws in sockets]
    started = time.perf_counter()
    await client.post(f"/jobs/{job_id}/cancel")
    outcomes = await asyncio.gather(*waiting)
    for ws in sockets:
        await ws.close()
    fanout = [(t - started) * 1000 for t in arrivals]
    return {"held": sum(outcomes), "opened": len(sockets), "failures": failures, "fanout": fanout}


def bench_ws(stack: Stack, figures: list[Any], commands: dict[str, str]) -> None:
    config = stack.config
    api = stack.ensure_api()
    stack.ensure_worker()
    key = stack.key(TENANT)

    async def main() -> None:
        async with httpx.AsyncClient(base_url=api, headers=stack.headers(TENANT), timeout=60) as c:
            missing = await _available(api, c, key)
            if missing is not None:
                figures.append(Skipped("websocket", f"not available ({missing})"))
                return
            # One completion at a time (SPACING apart): the event path's own latency.
            samples = await asyncio.gather(
                *(_completion(api, c, key, i * SPACING) for i in range(config.ws_samples))
            )
            ferry = [s for s in samples if s is not None]
            # All at once: one worker finishing (and announcing) every job in the same moment.
            at_once = await asyncio.gather(
                *(_completion(api, c, key) for _ in range(config.ws_samples))
            )
            burst = [s for s in at_once if s is not None]
            reference = await _pubsub_latency(config.redis_url, config.ws_samples)
            for p in (50, 95):
                figures.append(
                    Figure(
                        f"websocket completion latency p{p}, ms",
                        percentile(ferry, p),
                        percentile(reference, p),
                        "ms",
                        "Redis PUBLISH -> pattern subscriber",
                        higher_is_better=False,
                        note=(
                            f"{len(ferry)} one-row exports started {SPACING * 1000:.0f} ms apart;"
                            " finished_at -> `completed` frame. When all"
                            f" {len(burst)} finish at the same moment"
                            f" in one worker: p{p} {percentile(burst, p):.1f} ms"
                        ),
                    )
                )
            held = await _hold(api, c, key, config.ws_subscribers)
            figures.append(
                Figure(
                    "websocket subscribers held by one API process",
                    held["held"],
                    config.ws_subscribers,
                    "sockets",
                    "subscribers attempted",
                    note=(
                        f"{held['opened']} opened, {held['failures']} refused; cancel fan-out"
                        f" p50 {percentile(held['fanout'], 50):.0f} ms,"
                        f" max {max(held['fanout'], default=float('nan')):.0f} ms"
                    ),
                    plain_ratio=True,
                )
            )

    asyncio.run(main())
    commands["ws"] = (
        f"websockets client: {config.ws_samples} one-row exports (run_at now+2 s"
        f" + i x {SPACING:g} s; then all at now+2 s) followed on"
        f" /ws/jobs/{{id}}?token=KEY; {config.ws_subscribers} subscribers of one job, then cancel"
    )
