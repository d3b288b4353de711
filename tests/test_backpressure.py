"""Unit: the per-process bound that spares counting the whole queue on every submission."""

import pytest

from app import backpressure
from app.backpressure import QueueDepth


def test_the_queue_is_counted_until_a_count_says_it_is_far_from_full() -> None:
    depth = QueueDepth(limit=100)
    assert depth.limit_to_count() == 100  # nothing known yet
    depth.counted(10)
    assert depth.limit_to_count() is None  # 10 < 50: no count needed


def test_jobs_this_process_queues_raise_the_bound_to_half_the_limit() -> None:
    depth = QueueDepth(limit=100)
    depth.counted(48)
    depth.added()
    assert depth.limit_to_count() is None  # 49
    depth.added()
    assert depth.limit_to_count() == 100  # 50: from half full on, every submission counts


def test_a_bound_older_than_max_age_is_counted_again(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(backpressure.time, "monotonic", lambda: now[0])
    depth = QueueDepth(limit=100, max_age=1.0)
    depth.counted(0)
    now[0] += 0.9
    assert depth.limit_to_count() is None
    now[0] += 0.2  # other API processes may have queued jobs meanwhile
    assert depth.limit_to_count() == 100
    depth.counted(None)  # a submission that did not count does not refresh the bound
    assert depth.limit_to_count() == 100
