"""Figures, medians, alternating runs and timed shell pipelines."""

import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Figure:
    """One line of the table: Ferry's value beside its reference's, and their ratio.

    `higher_is_better` says which way the ratio is taken, so that a ratio > 1 always means
    Ferry is better than the reference (rows/s over rows/s, or reference time over Ferry's).
    """

    name: str
    ferry: float | None
    reference: float | None
    unit: str
    reference_name: str
    higher_is_better: bool = True
    target: str = ""
    note: str = ""
    runs: dict[str, list[float]] = field(default_factory=dict)
    plain_ratio: bool = False  # ratio = Ferry / reference, whichever way is better

    @property
    def ratio(self) -> float | None:
        if not self.ferry or not self.reference:
            return None
        if self.plain_ratio:
            return self.ferry / self.reference
        if self.higher_is_better:
            return self.ferry / self.reference
        return self.reference / self.ferry


@dataclass
class Skipped:
    name: str
    reason: str


def cpu_speed() -> float:
    """Seconds for a fixed pure-Python loop, best of 3: this VM's CPU speed changes from hour to
    hour (2-3x seen in one day), so reports taken at different times compare only beside it."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        sum(range(10_000_000))
        best = min(best, time.perf_counter() - started)
    return best


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def alternate(
    sides: dict[str, Callable[[], float]], repeat: int, label: str = ""
) -> dict[str, list[float]]:
    """Run each side `repeat` times, rotating which goes first, and collect their results."""
    names = list(sides)
    results: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeat):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            value = sides[name]()
            results[name].append(value)
            from bench.stack import log

            log(f"{label} run {i + 1}/{repeat} {name}: {value:.3f}")
    return results


def timed_shell(command: str, env: dict[str, str] | None = None) -> float:
    """Wall time of a bash pipeline; any failing stage fails the bench (pipefail)."""
    started = time.perf_counter()
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"reference command failed ({done.returncode}): {command}\n"
            f"{done.stderr.decode(errors='replace')[-2000:]}"
        )
    return elapsed
