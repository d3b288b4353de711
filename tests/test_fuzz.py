"""Schemathesis against the real API, authenticated, every operation of its OpenAPI.

Bounded and deterministic for `make test` (FERRY_FUZZ_EXAMPLES per operation, derandomized);
the README shows a longer run. Every response must be a documented status whose body, content
type and headers match the schema, and never a 5xx.
"""

import os

import hypothesis
import schemathesis

from app.main import create_app
from tests.conftest import Stack, Tenant

EXAMPLES = int(os.environ.get("FERRY_FUZZ_EXAMPLES", "25"))

config = schemathesis.Config.from_dict(
    {
        "generation": {
            "max-examples": EXAMPLES,
            "deterministic": True,
            "mode": "all",
            "allow-x00": True,
        },
        "checks": {
            # A schema-valid request may still name what does not exist or is not allowed (a
            # resource, a column, a job of nobody's, a cursor never issued, a tenant at its
            # limit): those are documented 4xx problems, not rejections of valid input.
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "3xx", 400, 401, 404, 409, 410, 422, 429]
            },
        },
    }
)
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
