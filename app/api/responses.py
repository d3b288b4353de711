"""How routers answer with a job: the body, `Location`, and the idempotent-replay header."""

from typing import Any

import orjson
from fastapi.responses import JSONResponse

from app import presenter
from app.api.problems import problem_responses
from app.jobs import Submitted
from app.services import Services

# What every authenticated operation with parameters may answer (problem+json).
PROBLEM_RESPONSES = problem_responses(
    s401="`unauthorized`: missing or unknown API key.",
    s422="`validation_error` (with `errors`), or a named code such as `unknown_column`.",
)
JOB_NOT_FOUND = problem_responses(s404="`job_not_found`, also for another tenant's job.")
# The 201/202 that create or act on a job name it in `Location`.
LOCATION = {
    "Location": {"description": "The job's URL: `/jobs/{id}`.", "schema": {"type": "string"}}
}


class JobResponse(JSONResponse):
    """A job as JSON, encoded by orjson: the answer to every submission, so its cost counts."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


async def job_response(
    services: Services, job: dict[str, Any], status_code: int = 200, **extra: Any
) -> JSONResponse:
    body = await presenter.present(job, services)
    body.update(extra)
    headers = {}
    if status_code in (201, 202):
        headers["Location"] = body["links"]["self"]
    return JobResponse(body, status_code=status_code, headers=headers)


async def submitted_response(
    services: Services, submitted: Submitted, **extra: Any
) -> JSONResponse:
    response = await job_response(services, submitted.job, submitted.status_code, **extra)
    if submitted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response
