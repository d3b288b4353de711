"""What can be exported and imported."""

from fastapi import APIRouter

from app.api.deps import ServicesDep, TenantDep
from app.api.problems import problem_responses
from app.schemas import ResourceList

router = APIRouter(tags=["resources"])


@router.get(
    "/resources",
    response_model=ResourceList,
    summary="List resources and their columns",
    responses=problem_responses(s401="`unauthorized`: missing or unknown API key."),
)
async def list_resources(services: ServicesDep, _: TenantDep) -> ResourceList:
    items = [
        {
            "name": r.name,
            "columns": [
                {"name": c.name, "type": c.type, "nullable": c.nullable} for c in r.columns
            ],
            "key": list(r.key),
            "operations": list(r.operations),
        }
        for r in services.resources
    ]
    return ResourceList.model_validate({"items": items})
