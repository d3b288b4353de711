"""Admission's costs: the per-process bound that spares counting the whole queue on every
submission (unit), and the plans of the counts that remain (real PostgreSQL)."""

import asyncpg
import pytest

from app import backpressure
from app.backpressure import QueueDepth
from tests.conftest import Stack


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


async def test_admission_counts_by_index_whatever_the_planner_estimates(stack: Stack) -> None:
    """A connection's cached plan for the counts was a sequential scan of ferry.jobs when it was
    made while the table was small, and stayed one as the table grew: every submission read the
    whole table. Here seq_page_cost and cpu_tuple_cost 0 make a scan look free."""
    plans: list[str] = []
    con = await asyncpg.connect(stack.dsn)
    try:
        con.add_log_listener(lambda _, message: plans.append(message.message))
        await con.execute("LOAD 'auto_explain'")
        await con.execute(
            "SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;"
            " SET seq_page_cost = 0; SET cpu_tuple_cost = 0; SET client_min_messages = log"
        )
        await con.fetchrow("SELECT * FROM ferry.admission($1, 1000, 20)", "t-plans")
    finally:
        await con.close()
    counts = [plan for plan in plans if "count(*)" in plan]
    assert len(counts) == 2, plans  # the queue's and the tenant's
    assert not [plan for plan in counts if "Seq Scan" in plan], counts
    tenant_count = next(plan for plan in counts if "tenant_id = p_tenant" in plan)
    assert "jobs_tenant_active" in tenant_count, tenant_count
