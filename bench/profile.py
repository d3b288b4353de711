"""BENCH_PROFILE=1: py-spy flame graphs of the worker during one export and of the API process
during submissions.

Writes bench/results/<name>-profile.svg, and <name>-profile.txt (collapsed stacks) beside it.
"""

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench.config import RESULTS
from bench.export import REQUEST, run_export
from bench.memory import TINY
from bench.stack import TENANT, Stack, log


def _py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("bench: py-spy not found: install the dev extras (`make install`)")
    return found


@contextlib.contextmanager
def recording(pid: int, name: str) -> Iterator[None]:
    """py-spy record of `pid` while the block runs: a flame graph and collapsed stacks."""
    outputs = (
        (RESULTS / f"{name}-profile.svg", "flamegraph"),
        (RESULTS / f"{name}-profile.txt", "raw"),
    )
    recorders = [
        subprocess.Popen(
            [
                _py_spy(),
                "record",
                "--pid",
                str(pid),
                "--rate",
                "250",
                # Blocking: py-spy pauses the process for each sample, so every stack is whole
                # (non-blocking samples come out truncated under load). Profiles are separate
                # runs from the measured ones.
                "--output",
                str(out),
                "--format",
                fmt,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        for out, fmt in outputs
    ]
    time.sleep(1.0)
    try:
        yield
    finally:
        for recorder in recorders:
            recorder.send_signal(signal.SIGINT)  # py-spy writes its output and exits
        for recorder in recorders:
            recorder.wait(timeout=60)
    log(f"profile written to {outputs[0][0]}; top frames:\n{top(outputs[1][0])}")


def top(raw: Path, n: int = 25) -> str:
    """The frames with the most samples (self time), from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        total += samples
        own[stack.split(";")[-1]] += samples
    return "\n".join(f"{100 * c / total:5.1f}% {frame}" for frame, c in own.most_common(n))


def profile_export(stack: Stack) -> None:
    api = stack.ensure_api()
    worker = stack.ensure_worker()
    with httpx.Client(base_url=api, headers=stack.headers(TENANT), timeout=60) as client:
        run_export(client, TINY)
        log(f"py-spy on worker {worker.pid} during one export")
        with recording(worker.pid, "export"):
            run_export(client, REQUEST)
