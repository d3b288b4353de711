"""The one place where errors become `application/problem+json` (RFC 9457)."""

import json
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from app.errors import FerryError

log = structlog.get_logger(__name__)

PROBLEM = "application/problem+json"


class FieldError(BaseModel):
    field: str = Field(description="The failing field, dotted: `filter.0.op`, `query.limit`.")
    message: str
    type: str


class Problem(BaseModel):
    """An error, as RFC 9457 problem details (`application/problem+json`)."""

    model_config = ConfigDict(extra="allow", title="Problem")

    type: str = "about:blank"
    status: int
    title: str
    detail: str
    code: str = Field(description="Machine-readable: `job_not_found`, `validation_error`, ...")
    errors: list[FieldError] | None = Field(None, description="Only on `validation_error`.")


def problem_responses(**described: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses, each a `Problem`: `problem_responses(s404="...")`.

    Headers the API always sends with a status are documented with it (401 `WWW-Authenticate`,
    429 and 503 `Retry-After`).
    """
    responses: dict[int | str, dict[str, Any]] = {}
    for name, description in described.items():
        status = int(name.removeprefix("s"))
        response: dict[str, Any] = {"model": Problem, "description": description}
        if status in _HEADERS:
            response["headers"] = _HEADERS[status]
        responses[status] = response
    return responses


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    429: _RETRY_AFTER,
    503: _RETRY_AFTER,
}

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "upload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "unavailable",
}


def problem(
    status: int,
    title: str,
    detail: str,
    code: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {"type": "about:blank", "status": status, "title": title, "detail": detail, "code": code}
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM)


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc if part != "body") or "body"


async def _ferry_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FerryError)
    return problem(exc.status, exc.title, exc.detail, exc.code, exc.headers, **exc.extra)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _field(tuple(e.get("loc", ()))), "message": e.get("msg", ""), "type": e["type"]}
        for e in exc.errors()
    ] or [{"field": "body", "message": "invalid request", "type": "value_error"}]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return problem(422, "Unprocessable Content", detail, "validation_error", errors=errors)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    if status == 400 and isinstance(exc.__cause__, ValueError | RecursionError):
        # FastAPI's "error parsing the body": not UTF-8, nested past the parser's depth, an
        # integer of more digits than Python converts. Like any body that is not a JSON
        # object, that is 422 validation_error (SPEC §3), not a bare 400.
        reason = type(exc.__cause__).__name__
        errors = [
            {"field": "body", "message": f"not a JSON object ({reason})", "type": "json_invalid"}
        ]
        detail = f"body: the request body is not a JSON object ({reason})."
        return problem(422, "Unprocessable Content", detail, "validation_error", errors=errors)
    title = _title(status)
    detail = exc.detail if isinstance(exc.detail, str) else title
    headers = dict(exc.headers) if exc.headers else None
    return problem(status, title, detail, _CODES.get(status, "error"), headers)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled_error", exc_info=exc)
    return problem(500, "Internal Server Error", "An unexpected error occurred.", "internal_error")


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _problem_media_types(schema: dict[str, Any]) -> dict[str, Any]:
    """Every error response in the OpenAPI is what is sent: a `Problem` as
    `application/problem+json` (clients and fuzzers check it).

    FastAPI documents a response model as `application/json`, a response given only a
    description as having no body, and adds its own 422 (`HTTPValidationError`), which Ferry never
    sends. All three become the Problem; an error response documented with another body (the 503
    of `/readyz`) is left alone.
    """
    ref = "#/components/schemas/Problem"
    problem_body = {"schema": {"$ref": ref}}
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            for status, response in operation.get("responses", {}).items():
                if not status.isdigit() or int(status) < 400:
                    continue
                content = response.setdefault("content", {})
                body_ref = content.get("application/json", {}).get("schema", {}).get("$ref", "")
                if not content or body_ref in (ref, "#/components/schemas/HTTPValidationError"):
                    content.pop("application/json", None)
                    content[PROBLEM] = problem_body
    if ref.rsplit("/", 1)[1] not in components:
        for name, definition in _problem_components().items():
            components.setdefault(name, definition)
    if "HTTPValidationError" not in json.dumps(schema.get("paths", {})):
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
    return schema


def _problem_components() -> dict[str, Any]:
    definition = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    definitions: dict[str, Any] = definition.pop("$defs", {})
    return {**definitions, "Problem": definition}


def install(app: FastAPI) -> None:
    app.add_exception_handler(FerryError, _ferry_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _problem_media_types(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
