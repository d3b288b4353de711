"""`ferry dev` (`make run`): the whole local stack in one terminal.

Checks PostgreSQL and Redis, starts the S3 emulator (moto) when no endpoint is configured,
migrates, seeds the demo table, prints a dev API key, then runs the API and one worker with their
output prefixed, until Ctrl-C stops every child.
"""

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import AsyncExitStack
from typing import IO

from app import cli, db
from app.config import Settings

EMULATOR_PORT = 9000
REDIS_HELP = (
    "Start Redis and point FERRY_REDIS_URL at it: `docker compose up -d redis`, or install your"
    " distribution's package (e.g. `apt-get install redis-server`)."
)


def wait_for_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.1)


def api_command(port: int) -> list[str]:
    """The API process on loopback, as `ferry dev`, the tests and the benchmarks run it. (The
    access lines are Ferry's own, from app.middleware.)"""
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1"]
    return [*command, "--port", str(port), "--no-access-log"]


def worker_command() -> list[str]:
    return [sys.executable, "-m", "arq", "worker.WorkerSettings"]


def wait_for_http(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Wait until `url` answers 200, failing early if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def stop(process: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_s3_emulator(port: int, stdout: int | IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    """moto's S3 server on loopback: a real HTTP endpoint, not an in-process fake."""
    beside_python = os.path.join(os.path.dirname(sys.executable), "moto_server")
    server = beside_python if os.path.exists(beside_python) else shutil.which("moto_server")
    if server is None:
        raise RuntimeError("moto_server not found: install the dev extras (`make install`)")
    process = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)],
        stdout=stdout if stdout is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    wait_for_port("127.0.0.1", port)
    return process


def emulator_env(endpoint: str) -> dict[str, str]:
    return {
        "FERRY_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "ferry-dev"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "ferry-dev-secret"),
    }


async def ensure_bucket(settings: Settings) -> None:
    from app.storage import Storage

    async with AsyncExitStack() as stack:
        storage = await Storage.open(settings, stack)
        await storage.ensure_bucket()


async def _check_redis(url: str) -> None:
    from redis.asyncio import Redis

    redis = Redis.from_url(url, socket_connect_timeout=2)
    try:
        await redis.ping()
    finally:
        await redis.aclose()


def _pump(name: str, stream: IO[bytes]) -> None:
    prefix = f"{name:>6} | ".encode()
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(prefix + line)
        sys.stdout.buffer.flush()


def _spawn(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    threading.Thread(target=_pump, args=(name, process.stdout), daemon=True).start()
    return process


def run(settings: Settings) -> int:
    env = dict(os.environ)
    children: list[subprocess.Popen[bytes]] = []
    try:
        asyncio.run(_check_redis(settings.redis_url))
    except Exception as e:
        print(
            f"ferry: cannot reach Redis at {settings.redis_url}: {e}\n{REDIS_HELP}", file=sys.stderr
        )
        return 1
    try:
        if not settings.s3_endpoint_url:
            endpoint = f"http://127.0.0.1:{EMULATOR_PORT}"
            emulator = start_s3_emulator(EMULATOR_PORT)
            children.append(emulator)
            env.update(emulator_env(endpoint))
            settings = settings.model_copy(update={"s3_endpoint_url": endpoint})
            print(f"S3 emulator (moto) at {endpoint}", file=sys.stderr)
        os.environ.update(env)
        asyncio.run(db.migrate(settings.database_url))
        asyncio.run(ensure_bucket(settings))
        rows = int(os.environ.get("FERRY_DEMO_ROWS", "100000"))
        asyncio.run(cli.seed_demo(settings.database_url, rows))
        key = asyncio.run(cli.create_key(settings.database_url, cli.DEMO_TENANT))
        print(
            f"\n  Ferry is starting: http://127.0.0.1:8000/docs\n"
            f"  Dev API key (tenant {cli.DEMO_TENANT!r}, {rows} demo users):\n\n    {key}\n\n"
            f'  curl -H "Authorization: Bearer {key}" http://127.0.0.1:8000/resources\n',
            flush=True,
        )
        children.append(_spawn("api", api_command(8000), env))
        children.append(_spawn("worker", worker_command(), env))
        while all(c.poll() is None for c in children):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
