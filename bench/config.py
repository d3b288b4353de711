"""What a bench run measures, from the environment."""

import os
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
# The checkout whose API and worker are measured (default: this one). Another branch's tree,
# e.g. from `git archive`, can be measured with this harness: BENCH_APP_ROOT=/path/to/tree.
APP_ROOT = Path(os.environ.get("BENCH_APP_ROOT") or ROOT).resolve()
MILLION = 1_000_000
FIGURES = ("export", "import", "memory", "api", "ws")


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").replace("_", "").replace(",", "")
    return int(raw) if raw else default


@dataclass(frozen=True)
class Config:
    rows: int
    big: bool
    repeat: int
    dsn: str
    redis_url: str
    only: tuple[str, ...]
    profile: bool
    api_seconds: float
    api_clients: int
    api_rate: float
    ws_subscribers: int
    ws_samples: int
    memory_points: tuple[int, ...] = field(default=())

    @classmethod
    def from_env(cls) -> "Config":
        big = os.environ.get("BENCH_BIG", "") not in ("", "0", "false")
        rows = _int("BENCH_ROWS", 10 * MILLION if big else MILLION)
        points = {MILLION, rows}
        if big:
            points.add(10 * MILLION)
        only = tuple(
            f.strip() for f in os.environ.get("BENCH_ONLY", ",".join(FIGURES)).split(",") if f
        )
        unknown = set(only) - set(FIGURES)
        if unknown:
            raise SystemExit(f"bench: unknown BENCH_ONLY figure(s) {sorted(unknown)}")
        return cls(
            rows=rows,
            big=big,
            repeat=max(1, _int("BENCH_REPEAT", 3)),
            dsn=os.environ.get(
                "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/ferry_bench"
            ),
            redis_url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/10"),
            only=only,
            profile=os.environ.get("BENCH_PROFILE", "") not in ("", "0", "false"),
            api_seconds=float(os.environ.get("BENCH_API_SECONDS", "8")),
            api_clients=_int("BENCH_API_CLIENTS", 64),
            api_rate=float(os.environ.get("BENCH_API_RATE", "1000")),
            ws_subscribers=_int("BENCH_WS_SUBSCRIBERS", 2000),
            ws_samples=_int("BENCH_WS_SAMPLES", 20),
            memory_points=tuple(sorted(points)),
        )
