"""Schemathesis against the real API, authenticated, every operation of its OpenAPI.

Bounded and deterministic for `make test` (FERRY_FUZZ_EXAMPLES per operation, derandomized);
the README shows a longer run. Every response must be a documented status whose body, content
type and headers match the schema, and never a 5xx.
"""

import os
import subprocess
import sys

import httpx
import hypothesis
import schemathesis

from app.main import create_app
from tests.conftest import ROOT, Stack, Tenant

EXAMPLES = int(os.environ.get("FERRY_FUZZ_EXAMPLES", "25"))

# The settings the CLI uses too (README "Security"); the number of examples is set below.
config = schemathesis.Config.from_path(ROOT / "schemathesis.toml")
# The schema the served /openapi.json is built from (test_served_schema_is_the_one_fuzzed).
schema = schemathesis.openapi.from_dict(create_app().openapi(), config=config)


@schema.parametrize()
@hypothesis.settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_api_conforms_to_its_schema(case: schemathesis.Case, stack: Stack, tenant: Tenant) -> None:
    case.call_and_validate(base_url=stack.api_url, headers=tenant.headers)


def test_cli_run_with_coverage_and_stateful_phases(stack: Stack, tenant: Tenant) -> None:
    """The CLI adds what the pytest integration does not run: the coverage phase (boundary and
    invalid values of every parameter) and stateful sequences through the OpenAPI's links
    (POST /exports, then GET /jobs/{id}, the download, the cancel with the returned id)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{stack.api_url}/openapi.json",
            "--header",
            f"Authorization: Bearer {tenant.key}",
            "--max-examples",
            str(EXAMPLES),
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]


def test_served_schema_is_the_one_fuzzed(stack: Stack) -> None:
    assert httpx.get(f"{stack.api_url}/openapi.json").json() == create_app().openapi()


def test_errors_are_documented_as_problem_json() -> None:
    operations = create_app().openapi()["paths"]
    for path, methods in operations.items():
        for method, operation in methods.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400 and path != "/readyz":  # 503 there is its body
                    assert list(response["content"]) == ["application/problem+json"], (
                        method,
                        path,
                        status,
                    )
            if path not in ("/healthz", "/readyz", "/metrics"):
                assert "401" in operation["responses"], (method, path)


def test_routes_that_only_describe_their_errors_still_document_the_problem() -> None:
    """A router written elsewhere (`responses={409: {"description": ...}}`, FastAPI's own 422)
    gets the Problem body in the OpenAPI without repeating it."""
    from fastapi import FastAPI

    from app.api import problems

    app = FastAPI()
    problems.install(app)

    @app.get("/x/{n}", responses={409: {"description": "`conflict`"}})
    async def x(n: int) -> dict[str, int]:
        return {"n": n}

    responses = app.openapi()["paths"]["/x/{n}"]["get"]["responses"]
    for status in ("409", "422"):
        assert responses[status]["content"] == {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        }
    assert "HTTPValidationError" not in app.openapi()["components"]["schemas"]
