"""Reading, listing and cancelling jobs."""

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from app import jobs, jobstore, presenter
from app.api.deps import ServicesDep, TenantDep
from app.api.problems import problem_responses
from app.api.responses import JOB_NOT_FOUND, LOCATION, PROBLEM_RESPONSES, job_response
from app.schemas import JobOut, JobPage, Kind, Status

router = APIRouter(tags=["jobs"])


@router.get(
    "/jobs/{job_id}",
    response_model=JobOut,
    summary="Get a job",
    responses={**PROBLEM_RESPONSES, **JOB_NOT_FOUND},
)
async def get_job(job_id: uuid.UUID, services: ServicesDep, tenant: TenantDep) -> JSONResponse:
    return await job_response(services, await jobstore.get_owned(services.pool, job_id, tenant))


def single_values(request: Request, _: TenantDep) -> None:
    """A repeated parameter (`?status=failed&status=queued`) is 422: FastAPI would keep one of
    them silently, and a proxy that checks another would see a different request. (After the
    key is checked: an anonymous request is 401 whatever its query.)"""
    repeated = sorted(
        {
            k
            for k, _ in request.query_params.multi_items()
            if len(request.query_params.getlist(k)) > 1
        }
    )
    if repeated:
        raise RequestValidationError(
            [
                {"loc": ("query", k), "msg": "given more than once", "type": "repeated"}
                for k in repeated
            ]
        )


class JobQuery(BaseModel):
    """`GET /jobs`'s query. An unknown parameter (`?stauts=failed`) is 422, as an unknown body
    field is: a typo never silently widens the list."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind | None = None
    status: Status | None = None
    # No NUL: PostgreSQL text cannot hold one (and no resource is named with one).
    resource: str | None = Field(None, max_length=63, pattern=r"^[^\x00]*$")
    limit: int = Field(20, ge=1, le=100)
    cursor: str | None = Field(None, max_length=512)


@router.get(
    "/jobs",
    response_model=JobPage,
    summary="List jobs, newest first",
    dependencies=[Depends(single_values)],
    responses={
        **PROBLEM_RESPONSES,
        **problem_responses(s400="`invalid_cursor`: a cursor this service did not issue."),
    },
)
async def list_jobs(
    services: ServicesDep, tenant: TenantDep, query: Annotated[JobQuery, Query()]
) -> JSONResponse:
    page, next_cursor = await jobstore.list_page(
        services.pool,
        tenant,
        kind=query.kind,
        status=query.status,
        resource=query.resource,
        limit=query.limit,
        cursor=query.cursor,
    )
    items = [await presenter.present(job, services) for job in page]
    return JSONResponse({"items": items, "next_cursor": next_cursor})


@router.post(
    "/jobs/{job_id}/cancel",
    status_code=202,
    response_model=JobOut,
    summary="Cancel a job",
    responses={
        202: {"description": "The job, cancelled or stopping.", "headers": LOCATION},
        **PROBLEM_RESPONSES,
        **JOB_NOT_FOUND,
        **problem_responses(s409="`job_finished`"),
    },
)
async def cancel_job(job_id: uuid.UUID, services: ServicesDep, tenant: TenantDep) -> JSONResponse:
    return await job_response(services, await jobs.cancel(services, tenant, job_id), 202)
