"""Dependencies: the process's services and the caller's tenant."""

from typing import Annotated

import structlog
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app import auth
from app.errors import Unauthorized
from app.services import Services

_bearer = HTTPBearer(auto_error=False, description="An API key from `ferry keys create`.")


async def get_services(request: Request) -> Services:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a hand-off per request.
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def current_tenant(
    services: ServicesDep,
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    key = auth.bearer_token(request.headers.get("authorization"))
    tenant = await services.keys.tenant(key) if key else None
    if tenant is None:
        raise Unauthorized(
            "A valid API key is required: `Authorization: Bearer <key>`.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    structlog.contextvars.bind_contextvars(tenant=tenant)
    return tenant


TenantDep = Annotated[str, Depends(current_tenant)]
