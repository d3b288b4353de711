"""The job as the API and the websocket show it: the stored row plus fresh presigned URLs."""

from datetime import UTC, datetime
from typing import Any

from app.schemas import job_out
from app.services import Services

__all__ = ["job_out", "present", "presign_ttl"]


def presign_ttl(services: Services, expires_at: datetime | None) -> int:
    """Presigned URLs live `FERRY_PRESIGN_TTL_SECONDS`, never past the result's expiry."""
    ttl = services.settings.presign_ttl_seconds
    if expires_at is not None:
        ttl = min(ttl, int((expires_at - datetime.now(UTC)).total_seconds()))
    return max(ttl, 1)


async def present(job: dict[str, Any], services: Services) -> dict[str, Any]:
    public = job_out(job)
    result = public["result"]
    if not result or job["status"] not in ("succeeded", "failed"):
        return public
    result = dict(result)
    expires_at = job["expires_at"]
    live = expires_at is None or expires_at > datetime.now(UTC)
    if job["kind"] == "export" and job["result_key"]:
        result["expires_at"] = expires_at.isoformat() if expires_at else None
        result["download_url"] = None
        if live:
            result["download_url"] = await services.storage.presign_get(
                job["result_key"],
                presign_ttl(services, expires_at),
                filename=job["params"].get("filename"),
            )
    if job["kind"] == "import":
        report_key = result.pop("error_report_key", None)
        result["error_report_url"] = None
        if report_key and live:
            result["error_report_url"] = await services.storage.presign_get(
                report_key, presign_ttl(services, expires_at)
            )
    public["result"] = result
    return public
