"""One hierarchy of domain errors; `app.api.problems` maps them to problem+json."""

from typing import Any


class FerryError(Exception):
    """A domain error with an HTTP status and a machine-readable code."""

    status: int = 500
    code: str = "internal_error"
    title: str = "Internal Server Error"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.headers = headers or {}
        self.extra = extra


class BadRequest(FerryError):
    status, code, title = 400, "bad_request", "Bad Request"


class Unauthorized(FerryError):
    status, code, title = 401, "unauthorized", "Unauthorized"


class NotFound(FerryError):
    status, code, title = 404, "not_found", "Not Found"


class JobNotFound(NotFound):
    code = "job_not_found"

    def __init__(self, job_id: object) -> None:
        super().__init__(f"No job {job_id}.")


class Conflict(FerryError):
    status, code, title = 409, "conflict", "Conflict"


class Gone(FerryError):
    status, code, title = 410, "gone", "Gone"


class PayloadTooLarge(FerryError):
    status, code, title = 413, "upload_too_large", "Payload Too Large"


class UnsupportedMediaType(FerryError):
    status, code, title = 415, "unsupported_media_type", "Unsupported Media Type"


class Invalid(FerryError):
    """422: the request is well-formed but names something that does not fit."""

    status, code, title = 422, "validation_error", "Unprocessable Content"


class TooManyRequests(FerryError):
    status, code, title = 429, "too_many_active_jobs", "Too Many Requests"


class Unavailable(FerryError):
    status, code, title = 503, "unavailable", "Service Unavailable"


class JobFailure(Exception):
    """A job ends `failed` with this code and message; never retried."""

    def __init__(self, code: str, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.result = result


class LeaseLost(Exception):
    """The worker no longer holds the job's lease: it must stop and write nothing."""


class ConfigError(Exception):
    """The service cannot start with this configuration (e.g. a bad resources file)."""
