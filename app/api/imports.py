"""POST /imports (streamed multipart or presigned upload), start, and the error report."""

import json
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.requests import ClientDisconnect

from app import uploads
from app.api.deps import ServicesDep, TenantDep
from app.api.responses import PROBLEM_RESPONSES, job_response, submitted_response
from app.errors import BadRequest, UnsupportedMediaType
from app.schemas import ImportParams, JobOut

router = APIRouter(tags=["imports"])

IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=255, description="Replays the original answer."),
]

_PARAMS_SCHEMA = ImportParams.model_json_schema()
_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "resource"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        **_PARAMS_SCHEMA["properties"],
                    },
                }
            },
            "application/json": {"schema": _PARAMS_SCHEMA},
        },
    }
}


@router.post(
    "/imports",
    status_code=202,
    response_model=JobOut,
    summary="Import a CSV: upload it in this request, or get a presigned upload URL",
    description=(
        "`multipart/form-data` with a `file` part and the import params as fields: the file "
        "streams to S3 and the job is queued (202). `application/json` with the params: the job "
        "waits in `awaiting_upload` (201) for a plain PUT of the file to `upload_url`, then "
        "`POST /imports/{id}/start`."
    ),
    openapi_extra=_REQUEST_BODY,
    responses={
        **PROBLEM_RESPONSES,
        201: {"description": "JSON form: the job with `upload_url` and `upload_expires_at`"},
        409: {"description": "`idempotency_key_reused`"},
        413: {"description": "`upload_too_large`"},
        415: {"description": "`unsupported_media_type`"},
        429: {"description": "`too_many_active_jobs`, with Retry-After"},
        503: {"description": "`queue_full`, with Retry-After"},
    },
)
async def create_import(
    request: Request,
    services: ServicesDep,
    tenant: TenantDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        try:
            submitted = await uploads.create_multipart(
                services, tenant, request.stream(), content_type, idempotency_key
            )
        except ClientDisconnect:  # the upload was aborted; nobody is left to answer
            raise BadRequest(
                "The client went away mid-upload.", code="client_disconnected"
            ) from None
        return await submitted_response(services, submitted)
    if media_type == "application/json":
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise uploads.invalid(
                [{"field": "body", "message": "not valid JSON", "type": "json_invalid"}]
            ) from None
        submitted, upload = await uploads.create_presigned(services, tenant, body, idempotency_key)
        return await submitted_response(services, submitted, **upload)
    raise UnsupportedMediaType("Send multipart/form-data (with a file) or application/json.")


@router.post(
    "/imports/{job_id}/start",
    status_code=202,
    response_model=JobOut,
    summary="Queue an import once its file is uploaded to `upload_url`",
    responses={
        **PROBLEM_RESPONSES,
        404: {"description": "`job_not_found`"},
        409: {"description": "`job_not_awaiting_upload`"},
        413: {"description": "`upload_too_large`"},
        422: {"description": "`upload_missing`"},
    },
)
async def start_import(job_id: uuid.UUID, services: ServicesDep, tenant: TenantDep) -> JSONResponse:
    job = await uploads.start(services, tenant, job_id)
    return await job_response(services, job, 202)


@router.get(
    "/imports/{job_id}/errors",
    status_code=307,
    summary="Redirect to the import's error report (CSV)",
    responses={
        **PROBLEM_RESPONSES,
        307: {"description": "Redirect to a presigned URL"},
        404: {"description": "`job_not_found`, or `error_report_not_found`"},
    },
)
async def error_report(
    job_id: uuid.UUID, services: ServicesDep, tenant: TenantDep
) -> RedirectResponse:
    return RedirectResponse(
        await uploads.error_report_url(services, tenant, job_id), status_code=307
    )
