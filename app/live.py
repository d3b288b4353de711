"""What a websocket sends (SPEC §4): hub events turned into frames, each exactly once, in order.

Every state change of a job bumps `jobs.seq` and its event carries that number. A stream
remembers the last seq it sent per job and drops anything not newer, so the snapshot and the
events after it never disagree, and nothing is sent twice. When the hub (re)subscribes to Redis,
events may have been lost: the stream re-reads its jobs from PostgreSQL (RESYNC) and sends only
what changed.
"""

import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from app import events, jobstore, presenter
from app.services import Services

Frame = dict[str, Any]

TERMINAL = jobstore.TERMINAL
FORGET_AFTER = 10_000  # finished jobs a tenant stream remembers (to drop their late events)


@dataclass
class _Seen:
    """What a stream last told its client about one job."""

    seq: int = -1
    status: str | None = None
    progress: dict[str, Any] | None = None

    def update(self, seq: int, frames: list[Frame]) -> None:
        self.seq = seq
        for frame in frames:
            if frame["type"] == "status":
                self.status = frame["status"]
            elif frame["type"] == "progress":
                self.progress = frame["progress"]
            elif frame["type"] in ("snapshot", "completed"):
                self.status = frame["job"]["status"]
                self.progress = frame["job"]["progress"]


def _newer(seen: _Seen, event: dict[str, Any]) -> list[Frame]:
    """An event's frames if it is newer than what the client has, else nothing."""
    if event["seq"] <= seen.seq:
        return []
    frames: list[Frame] = [f for f in event.get("frames", []) if isinstance(f, dict)]
    seen.update(event["seq"], frames)
    return frames


async def _catch_up(services: Services, seen: _Seen, job: jobstore.Job) -> list[Frame]:
    """The frames that bring a client from `seen` to the job's stored state."""
    if job["seq"] <= seen.seq:
        return []
    frames: list[Frame] = []
    job_id = str(job["id"])
    if job["status"] != seen.status:
        frames.append({"type": "status", "job_id": job_id, "status": job["status"]})
    if job["status"] == "running" and job["progress"] != seen.progress:
        frames.append(events.progress_frame(job["id"], job["progress"]))
    if job["status"] in TERMINAL:
        frames.append({"type": "completed", "job": await presenter.present(job, services)})
    seen.update(job["seq"], frames)
    seen.seq = job["seq"]
    return frames


@dataclass
class JobStream:
    """`/ws/jobs/{id}`: snapshot first, then newer events, ending with `completed`."""

    services: Services
    tenant: str
    job_id: uuid.UUID
    finished: bool = False
    _seen: _Seen = field(default_factory=_Seen)

    async def open(self) -> list[Frame] | None:
        """The snapshot (and `completed` for a finished job); None for an unknown or foreign
        job. Call it after subscribing, so that no event falls between the two."""
        job = await jobstore.get(self.services.pool, self.job_id, self.tenant)
        if job is None:
            return None
        public = await presenter.present(job, self.services)
        frames: list[Frame] = [{"type": "snapshot", "job": public}]
        if job["status"] in TERMINAL:
            frames.append({"type": "completed", "job": public})
        self._seen.update(job["seq"], frames)
        return self._until_completed(frames)

    async def handle(self, event: dict[str, Any]) -> list[Frame]:
        if self.finished:
            return []
        if event is events.RESYNC:
            job = await jobstore.get(self.services.pool, self.job_id, self.tenant)
            if job is None:
                return []
            return self._until_completed(await _catch_up(self.services, self._seen, job))
        return self._until_completed(_newer(self._seen, event))

    def _until_completed(self, frames: list[Frame]) -> list[Frame]:
        for i, frame in enumerate(frames):
            if frame["type"] == "completed":
                self.finished = True
                return frames[: i + 1]
        return frames


@dataclass
class TenantStream:
    """`/ws/jobs`: every newer event of the tenant's jobs; no snapshot, never closes itself."""

    services: Services
    tenant: str
    finished: bool = False  # a tenant stream has no last frame
    _seen: "OrderedDict[str, _Seen]" = field(default_factory=OrderedDict)
    _since: datetime | None = None

    async def open(self) -> list[Frame]:
        """Remember where the tenant's unfinished jobs stand (after subscribing)."""
        self._since, jobs = await jobstore.tenant_jobs_since(self.services.pool, self.tenant, None)
        for job in jobs:
            self._seen[str(job["id"])] = _Seen(job["seq"], job["status"], job["progress"])
        return []

    async def handle(self, event: dict[str, Any]) -> list[Frame]:
        if event is events.RESYNC:
            since = self._since
            self._since, jobs = await jobstore.tenant_jobs_since(
                self.services.pool, self.tenant, since
            )
            frames: list[Frame] = []
            for job in sorted(jobs, key=lambda j: j["created_at"]):
                frames += await _catch_up(self.services, self._get(str(job["id"])), job)
            return frames
        job_id = event.get("job_id")
        if not isinstance(job_id, str):
            return []
        return _newer(self._get(job_id), event)

    def _get(self, job_id: str) -> _Seen:
        seen = self._seen.get(job_id)
        if seen is None:
            seen = self._seen[job_id] = _Seen()
            if len(self._seen) > FORGET_AFTER:
                self._forget()
        return seen

    def _forget(self) -> None:
        """Forget the oldest finished jobs (unfinished ones stay)."""
        for job_id in list(self._seen):
            if len(self._seen) <= FORGET_AFTER // 2:
                return
            if self._seen[job_id].status in TERMINAL:
                del self._seen[job_id]
