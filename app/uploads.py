"""Getting an import's file into S3, and the import's lifecycle on the API side.

Two forms (SPEC §3): `multipart/form-data` streamed part by part into an S3 multipart upload
(never spooled whole: python-multipart's push parser, a byte count checked as data arrives, the
upload aborted on any error or disconnect), or a presigned PUT followed by `POST
/imports/{id}/start`. The object key comes from the tenant and the job id only, never from a
client's file name.
"""

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError
from python_multipart.multipart import MultipartParser, parse_options_header

from app import jobs, jobstore
from app.errors import Conflict, FerryError, Invalid, NotFound, PayloadTooLarge
from app.resources import Resource
from app.schemas import ImportParams
from app.services import Services

FILE_FIELD = "file"
FIELD_LIMIT = 64 * 1024  # bytes of one ordinary form field
DRAIN_LIMIT = 64 * 1024 * 1024  # after a 413, read this much more so the client sees the answer


def upload_key(tenant: str, job_id: uuid.UUID) -> str:
    return f"imports/{tenant}/{job_id}/upload"


def invalid(errors: list[dict[str, Any]]) -> Invalid:
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return Invalid(detail, errors=errors)


def parse_params(data: Any, *, form: bool = False) -> ImportParams:
    """The import params from a JSON body (JSON types exactly: `"dry_run": 0` is refused) or
    the form's fields (text, so "true" is a boolean); 422 validation_error if bad."""
    if not isinstance(data, dict):
        raise invalid([{"field": "body", "message": "a JSON object", "type": "model_type"}])
    try:
        return ImportParams.model_validate(data, strict=not form)
    except ValidationError as e:
        raise invalid(
            [
                {
                    "field": ".".join(str(p) for p in err["loc"]) or "body",
                    "message": err["msg"],
                    "type": err["type"],
                }
                for err in e.errors()
            ]
        ) from None


def importable(services: Services, params: ImportParams) -> Resource:
    """The resource, when it exists and allows imports (422 otherwise)."""
    return services.resources.get(params.resource, "import")


class _Form:
    """python-multipart callbacks: small fields kept, the file's bytes handed on per write."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.file_seen = False
        self.file_bytes = 0
        self.pending = bytearray()  # file bytes not yet written to S3
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._is_file = False
        self._value = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._name = None
        self._is_file = False
        self._value = bytearray()

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self._name = name
        self._is_file = name == FILE_FIELD
        if self._is_file:
            if self.file_seen:
                raise invalid(
                    [{"field": FILE_FIELD, "message": "only one file", "type": "value_error"}]
                )
            self.file_seen = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.pending += data[start:end]
            self.file_bytes += end - start
            return
        self._value += data[start:end]
        if len(self._value) > FIELD_LIMIT:
            raise invalid(
                [
                    {
                        "field": self._name or "form",
                        "message": "field too long",
                        "type": "value_error",
                    }
                ]
            )

    def _part_end(self) -> None:
        if self._is_file or not self._name:
            return
        try:
            self.fields[self._name] = self._value.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid(
                [{"field": self._name, "message": "not UTF-8", "type": "value_error"}]
            ) from None


async def receive_multipart(
    services: Services, stream: AsyncIterator[bytes], content_type: str, key: str
) -> dict[str, str]:
    """Stream the form's `file` part to `key`; returns the other fields. 413 past the limit."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise invalid(
            [{"field": "content-type", "message": "no multipart boundary", "type": "value_error"}]
        )
    settings = services.settings
    limit = settings.max_upload_bytes
    form = _Form()
    parser = MultipartParser(boundary, form.callbacks())  # type: ignore[arg-type]
    writer = services.storage.writer(
        key, settings.part_size_bytes, settings.parts_in_flight, "application/octet-stream"
    )
    try:
        async with writer:
            async for chunk in stream:
                parser.write(chunk)
                if form.file_bytes > limit:
                    raise PayloadTooLarge(f"The file is larger than {limit} bytes.")
                if form.pending:
                    await writer.write(bytes(form.pending))
                    form.pending.clear()
            parser.finalize()
            if not form.file_seen:
                raise invalid([{"field": FILE_FIELD, "message": "required", "type": "missing"}])
    except PayloadTooLarge:
        await _drain(stream)
        raise
    except ValueError as e:  # python-multipart's parse errors
        if isinstance(e, Invalid):
            raise
        raise invalid([{"field": "body", "message": str(e), "type": "value_error"}]) from None
    return form.fields


async def _drain(stream: AsyncIterator[bytes]) -> None:
    """Read (and drop) a bounded rest of the body so the client receives the 413."""
    drained = 0
    try:
        async for chunk in stream:
            drained += len(chunk)
            if drained > DRAIN_LIMIT:
                return
    except Exception:
        return


async def create_multipart(
    services: Services,
    tenant: str,
    stream: AsyncIterator[bytes],
    content_type: str,
    idempotency_key: str | None,
) -> jobs.Submitted:
    """POST /imports (multipart): upload, then commit the queued job; no job on any refusal."""
    await jobs.check_capacity(services, tenant)  # early refusal, before the upload
    job_id = uuid.uuid4()
    key = upload_key(tenant, job_id)
    fields = await receive_multipart(services, stream, content_type, key)
    try:
        params = parse_params({k: v for k, v in fields.items() if v != ""}, form=True)
        resource = importable(services, params)
        submitted = await _submit(services, tenant, resource, params, idempotency_key, job_id)
    except FerryError:  # refused before a job row exists: nobody will read the file
        await services.storage.delete(key)
        raise
    if submitted.replayed:
        await services.storage.delete(key)  # the original job has its own file
    return submitted


async def _submit(
    services: Services,
    tenant: str,
    resource: Resource,
    params: ImportParams,
    idempotency_key: str | None,
    job_id: uuid.UUID,
    awaiting_upload: bool = False,
) -> jobs.Submitted:
    return await jobs.submit(
        services,
        tenant=tenant,
        kind="import",
        resource=resource.name,
        params=params.model_dump(mode="json"),
        idempotency_key=idempotency_key,
        awaiting_upload=awaiting_upload,
        upload_key=upload_key(tenant, job_id),
        job_id=job_id,
    )


async def create_presigned(
    services: Services, tenant: str, body: Any, idempotency_key: str | None
) -> tuple[jobs.Submitted, dict[str, Any]]:
    """POST /imports (JSON): an `awaiting_upload` job and where to PUT the file."""
    params = parse_params(body)
    resource = importable(services, params)
    submitted = await _submit(
        services, tenant, resource, params, idempotency_key, uuid.uuid4(), awaiting_upload=True
    )
    job = submitted.job
    upload: dict[str, Any] = {"upload_url": None, "upload_expires_at": None}
    if job["status"] == "awaiting_upload":
        ttl = services.settings.presign_ttl_seconds
        upload["upload_url"] = await services.storage.presign_put(job["upload_key"], ttl)
        upload["upload_expires_at"] = (datetime.now(UTC) + timedelta(seconds=ttl)).isoformat()
    return submitted, upload


async def start(services: Services, tenant: str, job_id: uuid.UUID) -> jobstore.Job:
    """POST /imports/{id}/start: queue an `awaiting_upload` job once its file is there."""
    job = await jobstore.get_owned(services.pool, job_id, tenant)
    if job["kind"] != "import" or job["status"] != "awaiting_upload":
        raise Conflict(
            f"The job is {job['status']}, not awaiting_upload.", code="job_not_awaiting_upload"
        )
    size = await services.storage.size(job["upload_key"])
    if size is None:
        raise Invalid("Nothing was uploaded to the job's upload_url.", code="upload_missing")
    limit = services.settings.max_upload_bytes
    if size > limit:
        raise PayloadTooLarge(f"The uploaded file is larger than {limit} bytes.")
    return await jobs.start_upload(services, tenant, job_id)


async def error_report_url(services: Services, tenant: str, job_id: uuid.UUID) -> str:
    """A presigned URL of the import's error report; 404 when it has none."""
    job = await jobstore.get_owned(services.pool, job_id, tenant)
    key = (job["result"] or {}).get("error_report_key") if job["kind"] == "import" else None
    if not key:
        raise NotFound("This import has no error report.", code="error_report_not_found")
    url: str = await services.storage.presign_get(key, services.settings.presign_ttl_seconds)
    return url
