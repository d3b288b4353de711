"""BENCH_PROFILE=1: a py-spy flame graph of the worker during one export.

Writes bench/results/export-profile.svg (and a text summary of the hottest frames beside it).
"""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.config import RESULTS
from bench.export import REQUEST, run_export
from bench.stack import TENANT, Stack, log


def _py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("bench: py-spy not found: install the dev extras (`make install`)")
    return found


def profile_export(stack: Stack) -> None:
    api = stack.ensure_api()
    worker = stack.ensure_worker()
    svg = RESULTS / "export-profile.svg"
    raw = RESULTS / "export-profile.txt"
    with httpx.Client(base_url=api, headers=stack.headers(TENANT), timeout=60) as client:
        run_export(
            client, {"resource": "users", "filter": [{"column": "id", "op": "eq", "value": 1}]}
        )
        log(f"py-spy on worker {worker.pid} during one export")
        recorders = [
            subprocess.Popen(
                [
                    _py_spy(),
                    "record",
                    "--pid",
                    str(worker.pid),
                    "--rate",
                    "200",
                    "--nonblocking",
                    "--output",
                    str(out),
                    "--format",
                    fmt,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
            for out, fmt in ((svg, "flamegraph"), (raw, "raw"))
        ]
        time.sleep(1.0)
        try:
            run_export(client, REQUEST)
        finally:
            for recorder in recorders:
                recorder.send_signal(2)  # SIGINT: py-spy writes its output and exits
            for recorder in recorders:
                recorder.wait(timeout=60)
    log(f"profile written to {svg} and {raw}")
