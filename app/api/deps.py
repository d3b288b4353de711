"""Dependencies: the process's services and the caller's tenant."""

from typing import Annotated

import structlog
from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from app import auth
from app.errors import Unauthorized
from app.services import Services


async def get_services(request: Request) -> Services:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a hand-off per request.
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


class ApiKey(HTTPBearer):
    """The caller's tenant, from `Authorization: Bearer <key>`. One dependency that is also the
    OpenAPI security scheme (the docs page's Authorize button): each dependency costs FastAPI
    work on every request."""

    def __init__(self) -> None:
        super().__init__(
            scheme_name="HTTPBearer",
            auto_error=False,
            description="An API key from `ferry keys create`.",
        )

    async def __call__(self, request: Request) -> str:  # type: ignore[override]
        key = auth.bearer_token(request.headers.get("authorization"))
        services = await get_services(request)
        tenant = await services.keys.tenant(key) if key else None
        if tenant is None:
            raise Unauthorized(
                "A valid API key is required: `Authorization: Bearer <key>`.",
                headers={"WWW-Authenticate": "Bearer"},
            )
        structlog.contextvars.bind_contextvars(tenant=tenant)
        return tenant


TenantDep = Annotated[str, Depends(ApiKey())]
