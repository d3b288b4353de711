"""One bench run: start the stack, measure each figure beside its reference, write the table."""

import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from bench import report
from bench.config import Config
from bench.measure import Skipped, cpu_speed
from bench.stack import Stack, log

Bench = Callable[[Stack, list[Any], dict[str, str]], None]


def _benches() -> dict[str, Bench]:
    from bench.api import bench_api
    from bench.export import bench_export
    from bench.imports import bench_import
    from bench.memory import bench_memory
    from bench.ws import bench_ws

    # The API figures stop the worker: they run last but one; websockets restart it.
    return {
        "export": bench_export,
        "import": bench_import,
        "memory": bench_memory,
        "ws": bench_ws,
        "api": bench_api,
    }


def main() -> int:
    config = Config.from_env()
    if shutil.which("psql") is None:
        print(
            "bench: psql not found: the references need PostgreSQL's client on PATH",
            file=sys.stderr,
        )
        return 2
    started = time.monotonic()
    load = {"start": os.getloadavg()}
    speed = {"start": cpu_speed()}
    log(f"bench: {config.rows:,} rows, repeat {config.repeat}, load {load['start']}")
    figures: list[Any] = []
    commands: dict[str, str] = {}
    stack = Stack(config)
    failed = False
    try:
        stack.start()
        for name, bench in _benches().items():
            if name not in config.only:
                continue
            try:
                bench(stack, figures, commands)
            except Exception as e:
                failed = True
                traceback.print_exc()
                figures.append(Skipped(name, f"FAILED: {type(e).__name__}: {e}"))
        if config.profile:
            from bench.profile import profile_export

            profile_export(stack)
    finally:
        stack.close()
    load["end"] = os.getloadavg()
    speed["end"] = cpu_speed()
    body = report.write(config, figures, commands, load, speed, time.monotonic() - started)
    print(body)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
