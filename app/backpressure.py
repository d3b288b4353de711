"""Back pressure: refuse a submission when the queue is full (503) or the tenant has too many
active jobs (429), both with `Retry-After`.

The tenant's limit is exact: it is counted in the submission's own statement, under a lock per
tenant. Counting the whole queue on every submission would cost as much as the queue is long
(up to `FERRY_MAX_QUEUED_JOBS` index entries), so each API process keeps an upper bound instead
while the queue is far from full (see `QueueDepth`).
"""

import time

from app.errors import TooManyRequests, Unavailable
from app.jobstore import Load

RETRY_AFTER_QUEUE_FULL = 30
RETRY_AFTER_TENANT = 10


class QueueDepth:
    """This process's upper bound on the queued jobs of all tenants.

    It starts from an exact count and grows with each job this process admits (jobs only leave
    the queue elsewhere, which keeps it an upper bound for this process). It is trusted for
    `max_age` seconds and only while below half the limit; otherwise the next submission counts
    again. Other API processes' submissions are unseen for at most `max_age`, so the queue can
    pass its limit only if more than half the limit is submitted within that time.
    """

    def __init__(self, limit: int, max_age: float = 1.0) -> None:
        self.limit = limit
        self.max_age = max_age
        self._bound: int | None = None
        self._counted_at = 0.0

    def limit_to_count(self) -> int | None:
        """The limit to count the queue up to, or None when the bound makes a count needless."""
        fresh = time.monotonic() - self._counted_at < self.max_age
        if fresh and self._bound is not None and self._bound < self.limit // 2:
            return None
        return self.limit

    def counted(self, queued: int | None) -> None:
        if queued is not None:
            self._bound, self._counted_at = queued, time.monotonic()

    def added(self) -> None:
        """A job this process put in the queue."""
        if self._bound is not None:
            self._bound += 1


def refuse_if_full(load: Load, max_queued: int, max_active: int) -> None:
    if load.queued is not None and load.queued >= max_queued:
        raise Unavailable(
            "The queue is full; retry later.",
            code="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_QUEUE_FULL)},
        )
    if load.tenant_active >= max_active:
        raise TooManyRequests(
            f"This tenant already has {load.tenant_active} queued or running jobs.",
            code="too_many_active_jobs",
            headers={"Retry-After": str(RETRY_AFTER_TENANT)},
        )
