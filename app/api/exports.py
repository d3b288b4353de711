"""POST /exports and the download redirect."""

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse, RedirectResponse

from app import export, jobs, jobstore, presenter
from app.api.deps import ServicesDep, TenantDep
from app.api.problems import problem_responses
from app.api.responses import JOB_NOT_FOUND, LOCATION, PROBLEM_RESPONSES, submitted_response
from app.errors import Conflict, Gone
from app.schemas import ExportRequest, JobOut

router = APIRouter(tags=["exports"])

IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=255, description="Replays the original answer."),
]


@router.post(
    "/exports",
    status_code=202,
    response_model=JobOut,
    summary="Export a resource to CSV or JSON Lines in S3",
    responses={
        202: {"description": "The job, accepted.", "headers": LOCATION},
        **PROBLEM_RESPONSES,
        **problem_responses(
            s409="`idempotency_key_reused`",
            s413="`upload_too_large`: the JSON body is over its limit.",
            s429="`too_many_active_jobs`",
            s503="`queue_full`",
        ),
    },
)
async def create_export(
    body: ExportRequest,
    services: ServicesDep,
    tenant: TenantDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    resource = services.resources.get(body.resource, "export")
    query = export.build_query(resource, body, tenant)
    await export.check_values(services.pool, query)
    submitted = await jobs.submit(
        services,
        tenant=tenant,
        kind="export",
        resource=resource.name,
        params=body.model_dump(mode="json"),
        run_at=body.run_at,
        idempotency_key=idempotency_key,
    )
    return await submitted_response(services, submitted)


@router.get(
    "/exports/{job_id}/download",
    status_code=307,
    response_class=RedirectResponse,
    summary="Redirect to the export's file",
    responses={
        307: {
            "description": "Redirect to a presigned URL (no body).",
            "headers": {
                "Location": {"description": "The presigned URL.", "schema": {"type": "string"}}
            },
        },
        **PROBLEM_RESPONSES,
        **JOB_NOT_FOUND,
        **problem_responses(s409="`job_not_ready`", s410="`result_expired`"),
    },
)
async def download(job_id: uuid.UUID, services: ServicesDep, tenant: TenantDep) -> RedirectResponse:
    job = await jobstore.get_owned(services.pool, job_id, tenant)
    if job["kind"] != "export":
        raise Conflict("This job is not an export.", code="job_not_ready")
    if job["status"] != "succeeded" or not job["result_key"]:
        raise Conflict(f"The export is {job['status']}, not succeeded.", code="job_not_ready")
    expires_at = job["expires_at"]
    if expires_at is not None and expires_at <= datetime.now(UTC):
        raise Gone("The export's result has expired.", code="result_expired")
    url = await services.storage.presign_get(
        job["result_key"],
        presenter.presign_ttl(services, expires_at),
        filename=job["params"].get("filename"),
    )
    return RedirectResponse(url, status_code=307)
