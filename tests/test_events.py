"""Issue 5: live job events over websockets (SPEC §4), GET /jobs, cancel, run_at, metrics.

Against real uvicorn and arq processes with the `websockets` client. No sleeps as
synchronisation: every wait is on a frame under an `asyncio.timeout`, or a poll with a deadline.
"""

import asyncio
import base64
import contextlib
import itertools
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app import events, jobstore
from app.config import Settings
from app.storage import Storage
from tests.conftest import Stack, Tenant, free_port, next_ids, stop, wait_for_http, wait_for_job

FRAME_KEYS = {
    "snapshot": {"type", "job"},
    "status": {"type", "job_id", "status"},
    "progress": {"type", "job_id", "progress"},
    "completed": {"type", "job"},
}
JOB_KEYS = {
    "id", "kind", "status", "resource", "params", "progress", "result", "error", "attempts",
    "run_at", "created_at", "started_at", "finished_at", "links",
}  # fmt: skip
PROGRESS_KEYS = {"rows", "bytes", "total_rows", "percent"}
TERMINAL = ("succeeded", "failed", "cancelled")


def ws_url(base: str, path: str, token: str | None = None) -> str:
    url = base.replace("http://", "ws://", 1) + path
    return f"{url}?token={token}" if token is not None else url


async def recv(ws: ClientConnection, deadline: float = 30) -> dict[str, Any]:
    async with asyncio.timeout(deadline):
        frame: dict[str, Any] = json.loads(await ws.recv())
    check_shape(frame)
    return frame


async def until_close(ws: ClientConnection, deadline: float = 60) -> list[dict[str, Any]]:
    """Every frame until the server closes the socket."""
    frames = []
    async with asyncio.timeout(deadline):
        try:
            async for message in ws:
                frames.append(json.loads(message))
        except ConnectionClosed:
            pass
    for frame in frames:
        check_shape(frame)
    return frames


async def timed_until_close(
    ws: ClientConnection, deadline: float = 60
) -> list[tuple[float, dict[str, Any]]]:
    """Every frame until the server closes the socket, with its arrival time."""
    frames = []
    async with asyncio.timeout(deadline):
        try:
            async for message in ws:
                frames.append((time.monotonic(), json.loads(message)))
        except ConnectionClosed:
            pass
    for _, frame in frames:
        check_shape(frame)
    return frames


async def until_completed(
    ws: ClientConnection, job_ids: set[str], deadline: float = 60
) -> list[dict[str, Any]]:
    """Frames of a tenant stream until each of `job_ids` has its `completed` frame."""
    frames: list[dict[str, Any]] = []
    left = set(job_ids)
    async with asyncio.timeout(deadline):
        while left:
            frame = json.loads(await ws.recv())
            check_shape(frame)
            frames.append(frame)
            if frame["type"] == "completed":
                left.discard(frame["job"]["id"])
    return frames


def check_shape(frame: dict[str, Any]) -> None:
    assert frame["type"] in FRAME_KEYS, frame
    assert set(frame) == FRAME_KEYS[frame["type"]], frame
    if "job" in frame:
        assert set(frame["job"]) == JOB_KEYS, frame
    if frame["type"] == "progress":
        assert set(frame["progress"]) == PROGRESS_KEYS, frame
    if frame["type"] == "status":
        assert frame["status"] in (
            "awaiting_upload", "queued", "running", "succeeded", "failed", "cancelled"
        )  # fmt: skip


def frame_job_id(frame: dict[str, Any]) -> str:
    return str(frame["job"]["id"] if "job" in frame else frame["job_id"])


async def seed_users(pool: asyncpg.Pool, tenant: str, rows: int) -> None:
    first = next_ids(rows)
    await pool.execute(
        """INSERT INTO public.users (id, tenant_id, first_name, last_name, age, email)
           SELECT g, $1, 'Ada', 'Lovelace', 20 + g % 50, 'user' || g || '@example.com'
           FROM generate_series($2::bigint, $3::bigint) AS g""",
        tenant,
        first,
        first + rows - 1,
    )


async def submit(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/exports", json={"resource": "users", **body})
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


def later(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def after(status: str, path: list[str]) -> list[str]:
    """The statuses still to come after a snapshot in `status`, on the way along `path`. (On a
    loaded machine a job may start before the socket is open; the frames must still agree.)"""
    return path[path.index(status) + 1 :] if status in path else path


def without_urls(job: dict[str, Any]) -> dict[str, Any]:
    """A job minus its presigned URLs (each presentation signs afresh)."""
    job = dict(job)
    if job.get("result"):
        job["result"] = {k: v for k, v in job["result"].items() if not k.endswith("_url")}
    return job


# --- /ws/jobs/{id} ---------------------------------------------------------------------------


async def test_job_stream_frames_in_order(
    stack: Stack, client: httpx.AsyncClient, tenant: Tenant, pool: asyncpg.Pool
) -> None:
    await seed_users(pool, tenant.name, 20_000)
    # run_at in the near future: the socket is surely open before the job starts.
    job = await submit(client, run_at=later(2))
    async with connect(ws_url(stack.api_url, f"/ws/jobs/{job['id']}", tenant.key)) as ws:
        frames = await until_close(ws)
        assert ws.close_code == 1000
    assert frames[0]["type"] == "snapshot"
    assert frames[0]["job"]["id"] == job["id"]
    assert frames[-1]["type"] == "completed"
    assert [f["type"] for f in frames].count("completed") == 1
    statuses = [f["status"] for f in frames if f["type"] == "status"]
    assert statuses == after(frames[0]["job"]["status"], ["running", "succeeded"]), frames
    progress = [f["progress"] for f in frames if f["type"] == "progress"]
    assert progress, "no progress frame"
    rows = [p["rows"] for p in progress]
    assert rows == sorted(rows)
    assert all(frame_job_id(f) == job["id"] for f in frames)
    # Status comes before progress, progress before the end.
    types = [f["type"] for f in frames]
    if frames[0]["job"]["status"] == "queued":  # as it is unless the machine is very loaded
        assert types.index("status") < types.index("progress")
    completed = frames[-1]["job"]
    assert completed["status"] == "succeeded" and completed["result"]["rows"] == 20_000
    current = (await client.get(f"/jobs/{job['id']}")).json()
    assert without_urls(completed) == without_urls(current)
    assert completed["result"]["download_url"]


async def test_finished_job_gets_snapshot_completed_close(
    stack: Stack, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    job = await submit(client)
    await wait_for_job(client, job["id"])
    started = time.monotonic()
    async with connect(ws_url(stack.api_url, f"/ws/jobs/{job['id']}", tenant.key)) as ws:
        frames = await until_close(ws, deadline=10)
        assert ws.close_code == 1000
    assert time.monotonic() - started < 5
    assert [f["type"] for f in frames] == ["snapshot", "completed"]
    assert frames[0]["job"]["status"] == frames[1]["job"]["status"] == "succeeded"


async def test_header_auth_works(stack: Stack, client: httpx.AsyncClient, tenant: Tenant) -> None:
    job = await submit(client)
    await wait_for_job(client, job["id"])
    url = ws_url(stack.api_url, f"/ws/jobs/{job['id']}")
    async with connect(url, additional_headers=tenant.headers) as ws:
        frames = await until_close(ws, deadline=10)
    assert [f["type"] for f in frames] == ["snapshot", "completed"]


@pytest.mark.parametrize("token", [None, "", "fry_unknown"])
async def test_missing_or_unknown_key_closes_4401(stack: Stack, token: str | None) -> None:
    async with connect(ws_url(stack.api_url, f"/ws/jobs/{uuid.uuid4()}", token)) as ws:
        frames = await until_close(ws, deadline=10)
    assert frames == [] and ws.close_code == 4401
    async with connect(ws_url(stack.api_url, "/ws/jobs", token)) as ws:
        frames = await until_close(ws, deadline=10)
    assert frames == [] and ws.close_code == 4401


async def test_malformed_header_closes_4401(stack: Stack, tenant: Tenant) -> None:
    url = ws_url(stack.api_url, f"/ws/jobs/{uuid.uuid4()}")
    headers = {"Authorization": f"Basic {tenant.key}"}
    async with connect(url, additional_headers=headers) as ws:
        await until_close(ws, deadline=10)
    assert ws.close_code == 4401


async def test_unknown_or_foreign_job_closes_4404(
    stack: Stack, client: httpx.AsyncClient, tenant: Tenant, other_tenant: Tenant
) -> None:
    job = await submit(client)
    for path, key in [
        (f"/ws/jobs/{uuid.uuid4()}", tenant.key),
        ("/ws/jobs/not-a-uuid", tenant.key),
        (f"/ws/jobs/{job['id']}", other_tenant.key),
    ]:
        async with connect(ws_url(stack.api_url, path, key)) as ws:
            frames = await until_close(ws, deadline=10)
        assert frames == [] and ws.close_code == 4404, path


# --- /ws/jobs --------------------------------------------------------------------------------


async def test_tenant_stream_sees_only_own_jobs(
    stack: Stack, client: httpx.AsyncClient, tenant: Tenant, other_tenant: Tenant
) -> None:
    async with (
        httpx.AsyncClient(
            base_url=stack.api_url, headers=other_tenant.headers, timeout=60
        ) as other_client,
        connect(ws_url(stack.api_url, "/ws/jobs", tenant.key)) as mine,
        connect(ws_url(stack.api_url, "/ws/jobs", other_tenant.key)) as theirs,
    ):
        await _wait_subscribed(stack, 2)
        a = [await submit(client) for _ in range(2)]
        b = [await submit(other_client) for _ in range(2)]
        mine_frames = await until_completed(mine, {j["id"] for j in a})
        their_frames = await until_completed(theirs, {j["id"] for j in b})
    assert {frame_job_id(f) for f in mine_frames} == {j["id"] for j in a}
    assert {frame_job_id(f) for f in their_frames} == {j["id"] for j in b}
    for frames in (mine_frames, their_frames):
        for job_id in {frame_job_id(f) for f in frames}:
            own = [f for f in frames if frame_job_id(f) == job_id]
            statuses = [f["status"] for f in own if f["type"] == "status"]
            assert statuses == ["queued", "running", "succeeded"], own
            assert [f["type"] for f in own].count("completed") == 1


async def _wait_subscribed(stack: Stack, count: int, url: str | None = None) -> None:
    """Poll the API's open-websockets gauge until `count` sockets are open."""
    deadline = time.monotonic() + 10
    async with httpx.AsyncClient(base_url=url or stack.api_url) as anon:
        while True:
            text = (await anon.get("/metrics")).text
            if _gauge(text, "ferry_open_websockets") >= count:
                return
            assert time.monotonic() < deadline, "websockets did not open"
            await asyncio.sleep(0.05)


def _gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_subscriber_on_another_api_process_sees_completion(
    stack: Stack, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    process, url = stack.start_api()
    try:
        async with connect(ws_url(url, "/ws/jobs", tenant.key)) as ws:
            await _wait_subscribed(stack, 1, url)
            job = await submit(client)  # submitted through the first API process
            frames = await until_completed(ws, {job["id"]})
        assert frames[-1]["job"]["status"] == "succeeded"
        # And a job socket on the second process follows a job of the first.
        job = await submit(client, run_at=later(2))
        async with connect(ws_url(url, f"/ws/jobs/{job['id']}", tenant.key)) as ws:
            frames = await until_close(ws)
        assert frames[0]["type"] == "snapshot" and frames[-1]["type"] == "completed"
        statuses = [f["status"] for f in frames if f["type"] == "status"]
        assert statuses == after(frames[0]["job"]["status"], ["running", "succeeded"])
    finally:
        stop(process)


async def test_slow_consumer_does_not_stall_others(
    stack: Stack, client: httpx.AsyncClient, tenant: Tenant, pool: asyncpg.Pool
) -> None:
    await seed_users(pool, tenant.name, 5_000)
    # `sluggish` never calls recv() (the library still drains its socket: see the raw-socket
    # test below for a client that backs up the server).
    async with connect(
        ws_url(stack.api_url, "/ws/jobs", tenant.key), max_queue=1, close_timeout=1
    ) as sluggish:
        await _wait_subscribed(stack, 1)
        jobs = [await submit(client, run_at=later(1)) for _ in range(3)]
        async with connect(ws_url(stack.api_url, "/ws/jobs", tenant.key)) as reader:
            frames = await until_completed(reader, {j["id"] for j in jobs})
        assert len([f for f in frames if f["type"] == "completed"]) == 3
        for job in jobs:
            path = f"/ws/jobs/{job['id']}"
            async with connect(ws_url(stack.api_url, path, tenant.key)) as ws:
                assert (await until_close(ws, deadline=10))[-1]["type"] == "completed"
        assert sluggish.close_code is None  # still open, never blocked anyone


async def test_client_that_stops_reading_is_dropped_alone(
    stack: Stack, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    """A client that stops reading backs up its socket, then its queue: it is closed (1013)
    while another client of the same tenant keeps getting every frame at once."""
    host, port = stack.api_url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    # A raw client: it completes the handshake, then never reads another byte. (The websockets
    # library keeps draining its socket even with max_queue=1.)
    stuck_reader, stuck = await asyncio.open_connection(sock=sock)
    stuck.write(
        f"GET /ws/jobs?token={tenant.key} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    async with asyncio.timeout(10):
        assert b" 101 " in await stuck_reader.readuntil(b"\r\n\r\n")
    url = ws_url(stack.api_url, "/ws/jobs", tenant.key)
    fake_job = str(uuid.uuid4())
    frame = {"type": "progress", "job_id": fake_job, "progress": {
        "rows": 1, "bytes": 1, "total_rows": None, "percent": None}}  # fmt: skip
    per_event = 40
    async with connect(url) as reader:
        await _wait_subscribed(stack, 2)
        got = target = 0
        caught_up = asyncio.Event()

        async def read() -> None:
            nonlocal got
            while True:
                f = json.loads(await reader.recv())
                if f["type"] == "completed":
                    return
                if f["job_id"] != fake_job:
                    continue  # the real job's frames, after the flood
                got += 1
                if got >= target:
                    caught_up.set()

        reading = asyncio.create_task(read())
        r = aioredis.Redis.from_url(stack.settings.redis_url)
        sent = 0
        try:
            deadline = time.monotonic() + 60
            while _gauge((await client.get("/metrics")).text, "ferry_open_websockets") > 1:
                assert time.monotonic() < deadline, "the stuck client was never dropped"
                assert sent < 10000, "60 MB sent and the stuck client is still served"
                for _ in range(50):
                    sent += 1
                    event = {"tenant": tenant.name, "job_id": fake_job, "seq": sent,
                             "frames": [frame] * per_event}  # fmt: skip
                    await r.publish(events.channel(tenant.name, fake_job), json.dumps(event))
                # The reader has everything published so far within 10 s.
                target = sent * per_event
                caught_up.clear()
                if got < target:
                    async with asyncio.timeout(10):
                        await caught_up.wait()
        finally:
            await r.aclose()
        assert got == sent * per_event
        # The reader goes on with real events.
        job = await submit(client)
        async with asyncio.timeout(60):
            await reading
    stuck.close()
    logs = "".join(p.read_text(errors="replace") for p in stack.logs.glob("api-*.log"))
    assert "websocket_dropped" in logs
    assert (await client.get(f"/jobs/{job['id']}")).json()["status"] == "succeeded"


def test_channel_tenant_is_read_back_from_the_channel_name() -> None:
    job_id = uuid.uuid4()
    for tenant in ("acme", "a:b", "t-1"):
        assert events._channel_tenant(events.channel(tenant, job_id).encode()) == tenant


def test_overflowing_subscription_is_dropped_alone() -> None:
    hub = events.Hub(lambda: None)  # type: ignore[arg-type,return-value]
    slow = hub.subscribe("t1")
    fast = hub.subscribe("t1", "job-1")
    other = hub.subscribe("t2")
    for seq in range(events.QUEUE_SIZE + 10):
        hub.dispatch({"tenant": "t1", "job_id": "job-1", "seq": seq, "frames": []})
        if seq < events.QUEUE_SIZE:
            assert fast.queue.get_nowait()["seq"] == seq  # a reader keeps up
    assert slow.overflowed.is_set() and slow.queue.get_nowait() is events.OVERFLOW
    assert not fast.overflowed.is_set() and other.queue.empty()
    hub.dispatch({"tenant": "t1"})  # malformed events are ignored, not fatal
    hub.unsubscribe(slow)
    assert hub.subscribers == 2


async def test_hub_keeps_a_quiet_connection_and_resyncs_on_connect(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process hub on real Redis: a quiet subscription is kept alive by pings (no reconnect),
    each (re)subscription tells existing sockets to resync, events reach the right sockets."""
    unique = f"ferry:events:quiet-{uuid.uuid4().hex}"
    monkeypatch.setattr(events, "PATTERN", unique + ":*")
    monkeypatch.setattr(events, "PING_INTERVAL", 0.2)
    monkeypatch.setattr(events, "SILENCE_LIMIT", 1.0)
    hub = events.Hub(lambda: aioredis.Redis.from_url(stack.settings.redis_url))
    early = hub.subscribe("t", "j")  # subscribed before the hub is connected
    await hub.start()
    try:
        async with asyncio.timeout(10):
            await hub.connected.wait()
            assert await early.get() is events.RESYNC
        silent_until = time.monotonic() + 3 * events.SILENCE_LIMIT
        quiet = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(silent_until - time.monotonic()):
                await quiet.wait()  # nothing sets it: three silence limits pass, pings only
        assert hub.connections == 1 and hub.connected.is_set()
        event = {"tenant": "t", "job_id": "j", "seq": 1, "frames": [{"type": "status"}]}
        r = aioredis.Redis.from_url(stack.settings.redis_url)
        with structlog.testing.capture_logs() as logged:
            try:
                # Tenant u has no socket here: its event is skipped unread (malformed or not).
                await r.publish(f"{unique}:u:k", b"not json")
                await r.publish(f"{unique}:t:j", json.dumps(event))
            finally:
                await r.aclose()
            async with asyncio.timeout(10):
                got = await early.get()
        assert got["seq"] == 1 and got["frames"] == [{"type": "status"}]
        assert early.queue.empty()
        assert [e for e in logged if e["event"] == "event_malformed"] == []
    finally:
        await hub.stop()


async def kill_hub_connection(stack: Stack) -> None:
    """Kill the Redis connection of the (first) API process's hub, found by its client name."""
    assert stack.api is not None
    r = aioredis.Redis.from_url(stack.settings.redis_url)
    try:
        name = f"ferry-events-{stack.api.pid}"
        clients = [c for c in await r.client_list() if c.get("name") == name]
        assert clients, "the API's hub connection is not named as expected"
        for c in clients:
            await r.client_kill_filter(_id=c["id"])
    finally:
        await r.aclose()


async def _cancel_silently(pool: asyncpg.Pool, job_id: str) -> None:
    """A change nobody announces, as if its event had been lost."""
    await pool.execute(
        """UPDATE ferry.jobs SET status = 'cancelled', cancel_requested = true,
               finished_at = now(), seq = seq + 1
           WHERE id = $1""",
        uuid.UUID(job_id),
    )


async def test_tenant_stream_resyncs_after_redis_drop(
    stack: Stack, client: httpx.AsyncClient, tenant: Tenant, pool: asyncpg.Pool
) -> None:
    async with connect(ws_url(stack.api_url, "/ws/jobs", tenant.key)) as ws:
        await _wait_subscribed(stack, 1)
        quiet = await submit(client, run_at=later(3600))  # unchanged: nothing to resend
        lost = await submit(client, run_at=later(3600))
        for job in (quiet, lost):
            frame = await recv(ws)
            assert frame == {"type": "status", "job_id": job["id"], "status": "queued"}
        await _cancel_silently(pool, lost["id"])
        await kill_hub_connection(stack)
        frames = await until_completed(ws, {lost["id"]}, deadline=30)
        # Then a real event goes through the new connection, and nothing else came before it.
        await client.post(f"/jobs/{quiet['id']}/cancel")
        frames += await until_completed(ws, {quiet["id"]}, deadline=30)
    assert frames == [
        {"type": "status", "job_id": lost["id"], "status": "cancelled"},
        frames[1],
        {"type": "status", "job_id": quiet["id"], "status": "cancelled"},
        frames[3],
    ]
    assert frames[1]["type"] == "completed" and frames[1]["job"]["id"] == lost["id"]
    assert frames[3]["type"] == "completed" and frames[3]["job"]["id"] == quiet["id"]


async def test_redis_drop_resyncs_from_postgres(
    stack: Stack, client: httpx.AsyncClient, tenant: Tenant, pool: asyncpg.Pool
) -> None:
    """Events published while the hub is away are lost; the socket catches up from PostgreSQL."""
    assert stack.api is not None
    job = await submit(client, run_at=later(3600))
    async with connect(ws_url(stack.api_url, f"/ws/jobs/{job['id']}", tenant.key)) as ws:
        assert (await recv(ws))["type"] == "snapshot"
        # A change nobody announces (as if its event were lost), then the hub's connection dies.
        await _cancel_silently(pool, job["id"])
        await kill_hub_connection(stack)
        frames = await until_close(ws, deadline=30)
        assert ws.close_code == 1000
    assert [f["type"] for f in frames] == ["status", "completed"], frames
    assert frames[0]["status"] == "cancelled" and frames[1]["job"]["status"] == "cancelled"


# --- GET /jobs -------------------------------------------------------------------------------


async def _create_jobs(pool: asyncpg.Pool, tenant: str, n: int, **fields: Any) -> list[str]:
    ids = []
    for _ in range(n):
        job = await jobstore.create(
            pool,
            tenant=tenant,
            kind=fields.get("kind", "export"),
            status=fields.get("status", "succeeded"),
            resource=fields.get("resource", "users"),
            params={"resource": fields.get("resource", "users")},
        )
        ids.append(str(job["id"]))
    return ids


async def test_paging_every_job_exactly_once_while_jobs_arrive(
    client: httpx.AsyncClient, tenant: Tenant, pool: asyncpg.Pool
) -> None:
    existing = await _create_jobs(pool, tenant.name, 47)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 10}
        if cursor:
            params["cursor"] = cursor
        response = await client.get("/jobs", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"items", "next_cursor"}
        seen += [j["id"] for j in body["items"]]
        for j in body["items"]:
            assert set(j) == JOB_KEYS
        pages += 1
        await _create_jobs(pool, tenant.name, 3)  # new jobs arrive between pages
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 5
    assert len(seen) == len(set(seen))
    assert seen == list(reversed(existing))  # newest first, each once, none of the newcomers


async def test_cursor_of_another_tenant_is_refused(
    client: httpx.AsyncClient, tenant: Tenant, other_tenant: Tenant, pool: asyncpg.Pool
) -> None:
    await _create_jobs(pool, other_tenant.name, 3)
    async with httpx.AsyncClient(
        base_url=str(client.base_url), headers=other_tenant.headers
    ) as other:
        cursor = (await other.get("/jobs", params={"limit": 1})).json()["next_cursor"]
        assert cursor and (await other.get("/jobs", params={"cursor": cursor})).status_code == 200
    response = await client.get("/jobs", params={"cursor": cursor})
    assert response.status_code == 400 and response.json()["code"] == "invalid_cursor"


async def test_list_filters(client: httpx.AsyncClient, tenant: Tenant, pool: asyncpg.Pool) -> None:
    done = await _create_jobs(pool, tenant.name, 2)
    failed = await _create_jobs(pool, tenant.name, 1, status="failed", resource="adults")
    # awaiting_upload: no worker or reconciler touches it (this branch has no import handler).
    imported = await _create_jobs(pool, tenant.name, 1, kind="import", status="awaiting_upload")

    async def ids(**params: Any) -> list[str]:
        response = await client.get("/jobs", params=params)
        assert response.status_code == 200, response.text
        return [j["id"] for j in response.json()["items"]]

    assert await ids(status="succeeded") == list(reversed(done))
    assert await ids(status="failed") == failed
    assert await ids(resource="adults") == failed
    assert await ids(kind="import") == imported
    assert await ids(kind="export", status="queued") == []
    assert await ids(limit=1) == imported
    assert len(await ids(limit=100)) == 4


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 101}, {"limit": "x"}, {"status": "done"}, {"kind": "copy"}],
)
async def test_list_validation(client: httpx.AsyncClient, params: dict[str, Any]) -> None:
    response = await client.get("/jobs", params=params)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "validation_error" and body["errors"]


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage!!",
        "x",
        base64.urlsafe_b64encode(b'{"a": 1}').decode(),
        base64.urlsafe_b64encode(b'["2024-01-01T00:00:00", "not-a-uuid"]').decode(),
        base64.urlsafe_b64encode(b'["2024-01-01T00:00:00", "%s"]' % str(uuid.uuid4()).encode())
        .decode()
        .rstrip("="),
        # Well-formed, but no such job: a hand-made position.
        base64.urlsafe_b64encode(
            b'["2024-01-01T00:00:00+00:00", "%s"]' % str(uuid.uuid4()).encode()
        ).decode(),
    ],
)
async def test_forged_cursor_is_a_problem(client: httpx.AsyncClient, cursor: str) -> None:
    response = await client.get("/jobs", params={"cursor": cursor})
    assert response.status_code in (400, 422), response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] in ("invalid_cursor", "validation_error")


# --- cancel ----------------------------------------------------------------------------------


async def test_cancel_queued_job(
    stack: Stack, client: httpx.AsyncClient, tenant: Tenant, other_tenant: Tenant
) -> None:
    job = await submit(client, run_at=later(3600))
    url = ws_url(stack.api_url, f"/ws/jobs/{job['id']}", tenant.key)
    async with connect(url) as ws, connect(ws_url(stack.api_url, "/ws/jobs", tenant.key)) as all_:
        assert (await recv(ws))["type"] == "snapshot"
        await _wait_subscribed(stack, 2)
        async with httpx.AsyncClient(base_url=stack.api_url, headers=other_tenant.headers) as other:
            assert (await other.post(f"/jobs/{job['id']}/cancel")).status_code == 404
        response = await client.post(f"/jobs/{job['id']}/cancel")
        assert response.status_code == 202, response.text
        cancelled = response.json()
        assert cancelled["status"] == "cancelled"
        assert cancelled["finished_at"] and cancelled["started_at"] is None
        frames = await until_close(ws, deadline=10)
        assert ws.close_code == 1000
        tenant_frames = await until_completed(all_, {job["id"]}, deadline=10)
    assert [f["type"] for f in frames] == ["status", "completed"]
    assert frames[0]["status"] == "cancelled"
    assert frames[1]["job"]["started_at"] is None and frames[1]["job"]["finished_at"]
    assert tenant_frames[-1]["job"]["status"] == "cancelled"
    # Terminal now: 409, and the worker never starts it.
    response = await client.post(f"/jobs/{job['id']}/cancel")
    assert response.status_code == 409 and response.json()["code"] == "job_finished"
    assert (await client.get(f"/jobs/{job['id']}")).json()["attempts"] == 0


async def test_cancel_finished_job_is_409(client: httpx.AsyncClient) -> None:
    job = await submit(client)
    await wait_for_job(client, job["id"])
    response = await client.post(f"/jobs/{job['id']}/cancel")
    assert response.status_code == 409
    assert response.json()["code"] == "job_finished"
    assert (await client.post(f"/jobs/{uuid.uuid4()}/cancel")).status_code == 404


@pytest.fixture
async def storage(stack: Stack) -> AsyncIterator[Storage]:
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as exits:
        yield await Storage.open(stack.settings, exits)


async def test_cancel_running_export_aborts_its_upload(
    stack: Stack,
    client: httpx.AsyncClient,
    tenant: Tenant,
    pool: asyncpg.Pool,
    storage: Storage,
) -> None:
    await seed_users(pool, tenant.name, 400_000)
    job = await submit(client, format="jsonl")
    prefix = f"exports/{tenant.name}/{job['id']}/"
    async with connect(ws_url(stack.api_url, f"/ws/jobs/{job['id']}", tenant.key)) as ws:
        snapshot = await recv(ws)
        assert snapshot["type"] == "snapshot"
        # Wait until rows flow into an open multipart upload, then cancel.
        deadline = time.monotonic() + 60
        while not await storage.open_uploads(prefix):
            assert time.monotonic() < deadline, "the export never opened its upload"
            await asyncio.sleep(0.02)
        asked = time.monotonic()
        response = await client.post(f"/jobs/{job['id']}/cancel")
        assert response.status_code == 202, response.text
        timed = await timed_until_close(ws, deadline=30)
        noticed = time.monotonic() - asked
    frames = [f for _, f in timed]
    assert frames[-1]["type"] == "completed", frames[-3:]
    final = frames[-1]["job"]
    assert final["status"] == "cancelled", final
    assert final["started_at"] and final["finished_at"] and final["result"] is None
    # Heartbeat 0.5 s here (1 s by default): noticed well within 2 s; the rest is the COPY cancel,
    # the multipart abort and the final write, on a shared machine.
    assert noticed < 3.0, f"cancel took {noticed:.2f}s"
    before = [] if snapshot["job"]["status"] == "running" else ["running"]
    assert [f["status"] for f in frames if f["type"] == "status"] == [*before, "cancelled"]
    assert await storage.open_uploads(prefix) == []
    listing = await storage.client.list_objects_v2(Bucket=stack.settings.s3_bucket, Prefix=prefix)
    assert listing.get("KeyCount", 0) == 0


async def test_progress_rate_while_rows_flow(
    stack: Stack, client: httpx.AsyncClient, tenant: Tenant, pool: asyncpg.Pool
) -> None:
    """SPEC §4: at most 4 progress frames per second, at least one every 2 s while rows flow."""
    await seed_users(pool, tenant.name, 300_000)
    job = await submit(client, run_at=later(1), format="jsonl", compression="gzip")
    async with connect(ws_url(stack.api_url, f"/ws/jobs/{job['id']}", tenant.key)) as ws:
        timed = await timed_until_close(ws)
    assert timed[-1][1]["job"]["status"] == "succeeded"
    times = [t for t, f in timed if f["type"] == "progress"]
    statuses = {f["status"]: t for t, f in timed if f["type"] == "status"}
    running_for = statuses["succeeded"] - statuses["running"]
    # However fast the export ran here, one frame at its start and one per 2 s after.
    assert len(times) >= 1 + int(running_for / 2), timed
    # Arrival times carry network jitter: allow one frame of slack per window.
    for i, t in enumerate(times):
        assert len([u for u in times[i:] if u - t < 1.0]) <= 5, times
    assert all(b - a < 2.5 for a, b in itertools.pairwise(times)), times
    rows = [f["progress"]["rows"] for _, f in timed if f["type"] == "progress"]
    assert rows == sorted(rows) and rows[-1] > 0


async def test_requeue_of_a_job_asked_to_cancel_ends_cancelled(
    tenant: Tenant, pool: asyncpg.Pool
) -> None:
    """A running job handed back (transient error, shutdown) after a cancel request stops there:
    no worker would ever claim it again."""
    job = await jobstore.create(
        pool, tenant=tenant.name, kind="export", status="queued", resource="users", params={}
    )
    claimed = await jobstore.claim(pool, job["id"], 60)
    assert claimed is not None
    assert (await jobstore.request_cancel(pool, job["id"], tenant.name))["status"] == "running"
    handed_back = await jobstore.requeue(pool, job["id"], claimed["lease"], None)
    assert handed_back is not None and handed_back["status"] == "cancelled"
    assert handed_back["finished_at"] is not None and handed_back["seq"] > claimed["seq"]


async def test_cancel_running_job_that_waits_on_a_lock(
    stack: Stack, client: httpx.AsyncClient, tenant: Tenant, pool: asyncpg.Pool
) -> None:
    """A job stuck before its first row (here: on a table lock) is cancelled too."""
    async with pool.acquire() as con, con.transaction():
        await con.execute("LOCK TABLE public.awkward IN ACCESS EXCLUSIVE MODE")
        response = await client.post("/exports", json={"resource": "awkward"})
        job = response.json()
        await wait_for_job(client, job["id"], 30, ("running",))
        asked = time.monotonic()
        assert (await client.post(f"/jobs/{job['id']}/cancel")).status_code == 202
        final = await wait_for_job(client, job["id"], 10)
        noticed = time.monotonic() - asked
    assert final["status"] == "cancelled" and final["started_at"] and final["finished_at"]
    assert noticed < 3.0


# --- run_at ----------------------------------------------------------------------------------


async def test_run_at_delays_the_start(client: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    run_at = datetime.now(UTC) + timedelta(seconds=3)
    job = await submit(client, run_at=run_at.isoformat())
    assert job["status"] == "queued" and job["run_at"] is not None
    assert datetime.fromisoformat(job["run_at"]) == run_at
    # Before its time the job stays queued, and no worker may claim it.
    assert await jobstore.claim(pool, uuid.UUID(job["id"]), 60) is None
    assert (await client.get(f"/jobs/{job['id']}")).json()["status"] == "queued"
    final = await wait_for_job(client, job["id"], 30)
    assert final["status"] == "succeeded"
    started = datetime.fromisoformat(final["started_at"])
    assert run_at <= started < run_at + timedelta(seconds=3), (run_at, started)


# --- logs and metrics ------------------------------------------------------------------------


async def test_websocket_token_never_reaches_logs(
    stack: Stack, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    job = await submit(client)
    await wait_for_job(client, job["id"])
    async with connect(ws_url(stack.api_url, f"/ws/jobs/{job['id']}", tenant.key)) as ws:
        await until_close(ws, deadline=10)
    async with connect(ws_url(stack.api_url, "/ws/jobs", tenant.key + "x")) as ws:
        await until_close(ws, deadline=10)
    logs = "".join(p.read_text(errors="replace") for p in stack.logs.glob("api-*.log"))
    assert f"/ws/jobs/{job['id']}?token=[redacted]" in logs
    assert tenant.key not in logs


async def test_api_metrics(stack: Stack, client: httpx.AsyncClient, tenant: Tenant) -> None:
    job = await submit(client)
    await wait_for_job(client, job["id"])
    async with connect(ws_url(stack.api_url, "/ws/jobs", tenant.key)):
        await _wait_subscribed(stack, 1)
    text = (await client.get("/metrics")).text
    assert _gauge(text, 'ferry_jobs{kind="export",status="succeeded"}') >= 1
    assert "ferry_queue_depth " in text and "ferry_open_websockets " in text
    assert 'ferry_jobs_submitted_total{kind="export"}' in text


async def test_worker_serves_its_metrics(stack: Stack, client: httpx.AsyncClient) -> None:
    port = free_port()
    worker = stack.start_worker(FERRY_WORKER_METRICS_PORT=str(port))
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_for_http(url, worker)
        async with httpx.AsyncClient() as http:
            text = (await http.get(url)).text
            assert "ferry_job_duration_seconds" in text and "ferry_rows_total" in text
            # Two workers share the queue: submit until this one has run an export.
            deadline = time.monotonic() + 60
            while 'ferry_jobs_finished_total{kind="export",status="succeeded"}' not in text:
                assert time.monotonic() < deadline, "the metrics worker never ran a job"
                await wait_for_job(client, (await submit(client))["id"])
                text = (await http.get(url)).text
        assert 'ferry_rows_total{kind="export"}' in text
        assert 'ferry_bytes_total{kind="export"}' in text
        assert 'ferry_job_duration_seconds_count{kind="export"}' in text
    finally:
        stop(worker)


def test_default_heartbeat_notices_a_cancel_within_2s() -> None:
    assert Settings.model_fields["heartbeat_interval_seconds"].default <= 1.5
