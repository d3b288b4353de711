"""How routers answer with a job: the body, `Location`, and the idempotent-replay header."""

from typing import Any

from fastapi.responses import JSONResponse

from app import presenter
from app.jobs import Submitted
from app.services import Services

PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or unknown API key (problem+json)."},
    422: {"description": "Invalid request (problem+json with `code` and `errors`)."},
}


async def job_response(
    services: Services, job: dict[str, Any], status_code: int = 200, **extra: Any
) -> JSONResponse:
    body = await presenter.present(job, services)
    body.update(extra)
    headers = {}
    if status_code in (201, 202):
        headers["Location"] = body["links"]["self"]
    return JSONResponse(body, status_code=status_code, headers=headers)


async def submitted_response(
    services: Services, submitted: Submitted, **extra: Any
) -> JSONResponse:
    response = await job_response(services, submitted.job, submitted.status_code, **extra)
    if submitted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response
