"""The table: printed, and written to bench/results/latest.md with the machine and versions."""

import os
import platform
import subprocess
from contextlib import suppress
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg
import redis

from bench import awscli
from bench.config import RESULTS, Config
from bench.measure import Figure, Skipped

PACKAGES = ("fastapi", "uvicorn", "arq", "asyncpg", "aioboto3", "aiobotocore", "redis", "moto")


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit in ("rows/s", "req/s", "sockets"):
        return f"{value:,.0f}"
    if unit == "x":
        return f"{value:.2f}"
    return f"{value:,.1f}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def machine() -> dict[str, str]:
    return {
        "cores (nproc)": str(os.cpu_count()),
        "RAM": _ram(),
        "CPU": _cpu_model(),
        "kernel": platform.release(),
    }


async def _postgres(dsn: str) -> str:
    con = await asyncpg.connect(dsn)
    try:
        return str(await con.fetchval("SHOW server_version"))
    finally:
        await con.close()


def versions(config: Config) -> dict[str, str]:
    import asyncio

    found = {"Python": platform.python_version()}
    try:
        found["PostgreSQL"] = asyncio.run(_postgres(config.dsn))
    except Exception as e:  # the report must still be written
        found["PostgreSQL"] = f"unknown ({e})"
    try:
        info: dict[str, Any] = redis.Redis.from_url(config.redis_url).info()  # type: ignore[assignment]
        found["Redis"] = str(info["redis_version"])
    except redis.RedisError:
        found["Redis"] = "unknown"
    psql = subprocess.run(["psql", "--version"], capture_output=True, text=True, check=False)
    found["psql"] = psql.stdout.split()[2] if psql.returncode == 0 else "unknown"
    if awscli.AWS.exists():
        found["aws-cli"] = awscli.version()
    for name in PACKAGES:
        with suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def table(figures: list[Any]) -> str:
    lines = [
        "| figure | Ferry | reference | ratio | target | reference is |",
        "|---|---:|---:|---:|---|---|",
    ]
    for f in figures:
        if isinstance(f, Skipped):
            lines.append(f"| {f.name}: {f.reason} | — | — | — | | skipped |")
            continue
        assert isinstance(f, Figure)
        ratio = f"{f.ratio:.2f}x" if f.ratio is not None else "—"
        reference = f.reference_name.replace("|", "\\|")  # a pipe inside a table cell
        lines.append(
            f"| {f.name} | {_fmt(f.ferry, f.unit)} | {_fmt(f.reference, f.unit)} | {ratio}"
            f" | {f.target} | {reference} |"
        )
    return "\n".join(lines)


def write(
    config: Config,
    figures: list[Any],
    commands: dict[str, str],
    load: dict[str, tuple[float, float, float]],
    speed: dict[str, float],
    elapsed: float,
) -> str:
    notes = [f"- {f.name}: {f.note}" for f in figures if isinstance(f, Figure) and f.note]
    runs = [
        f"- {f.name}: "
        + "; ".join(f"{side} {', '.join(f'{v:.3f}' for v in vs)}" for side, vs in f.runs.items())
        for f in figures
        if isinstance(f, Figure) and f.runs
    ]
    text = [
        "# Ferry benchmarks (`make bench`)",
        "",
        f"Run at {datetime.now(UTC).isoformat(timespec='seconds')} in {elapsed:.0f} s:"
        f" {config.rows:,} rows, median of {config.repeat} alternating runs per side.",
        "Ratios > 1 mean Ferry is better than the reference, except the memory lines, where"
        " the ratio is Ferry / reference (peak over idle; larger over smaller).",
        "",
        table(figures),
        "",
        "Load average (1, 5, 15 min): "
        + "; ".join(f"{k} {a:.2f} {b:.2f} {c:.2f}" for k, (a, b, c) in load.items())
        + ". On 2 shared cores a load above ~1 means the figures are noisy.",
        "",
        "CPU speed (`sum(range(10_000_000))` in Python, best of 3, lower is faster): "
        + "; ".join(f"{k} {v:.3f} s" for k, v in speed.items())
        + ". Compare absolute figures of runs taken at different times only beside it.",
        "",
        "## Notes",
        *notes,
        "",
        "## Raw runs (seconds, or per-second rates for the API)",
        *runs,
        "",
        "## Machine",
        *[f"- {k}: {v}" for k, v in machine().items()],
        "",
        "## Versions",
        *[f"- {k}: {v}" for k, v in versions(config).items()],
        "",
        "## Commands",
        'Ferry: `POST /exports {"resource": "users"}` then `GET /jobs/{id}` every 20 ms until'
        " `succeeded` (API: `uvicorn app.main:app`, one worker: `arq worker.WorkerSettings`).",
        "",
        *[f"- {k}:\n  ```sh\n  {v}\n  ```" for k, v in commands.items()],
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    body = "\n".join(text)
    (RESULTS / "latest.md").write_text(body)
    return body
