"""The OpenAPI description, and a property-based fuzz run against it (schemathesis)."""

import pytest
from starlette.testclient import TestClient

from mlx_lora_api.config import Settings
from mlx_lora_api.web.app import create_app

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import CHECKS

# A data folder with no models: every request is checked all the way through the service
# (ids, limits, model lookup, the Hub stand-in) without starting a training job.
# Valid-looking requests still fail there (404, 503), so "valid data is accepted" is left out.
EXAMPLES = 25  # per operation
NEVER_ENDS = "/jobs/events"
EXCLUDED = [
    "positive_data_acceptance",
    "missing_required_header",
    "ignored_auth",
    "unsupported_method",
    "not_a_server_error",
]


MEANT_503 = (
    "the Hub cannot be reached",  # a Hub repo id while the Hub is out of reach (here it always is)
    "this server has no Hugging Face token",  # a push, where the server has no Hub credential
)


def no_server_error(ctx, response, case):
    """No 5xx, but the 503s the service means: the Hub out of reach (the tests point it at a closed
    port), and no Hub token on the server for a push."""
    if response.status_code >= 500:
        meant = response.status_code == 503 and any(m in response.text for m in MEANT_503)
        assert meant, f"server error {response.status_code}: {response.text[:300]}"


@pytest.fixture
def api_schema(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, default_model="nothing-here", model_roots=[tmp_path]))
    with TestClient(app, base_url="http://127.0.0.1:8000"):  # runs the lifespan: the store and runner
        yield schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Host": "127.0.0.1:8000"})


def test_the_description_is_openapi_3_1_with_every_route(tmp_path):
    with TestClient(create_app(Settings(data_dir=tmp_path)), base_url="http://127.0.0.1:8000") as client:
        document = client.get("/openapi.json").json()
    assert document["openapi"] == "3.1.0"
    assert {"/lora-finetune", "/lora-fuse", "/jobs/{job_id}", "/generate", "/v1/chat/completions"} <= set(
        document["paths"]
    )
    finetune = document["components"]["schemas"]["FinetuneRequest"]
    assert finetune["required"] == ["base_model", "training_data"] and finetune["additionalProperties"] is False


def test_no_input_breaks_the_service_or_its_schema(api_schema):
    """Every operation, examples from its schema and outside it; no 5xx, every answer as described."""
    from hypothesis import given

    excluded = [c for c in CHECKS.get_all() if c.__name__ in EXCLUDED]
    # GET /jobs/events streams every job's events and never ends (the dashboard's live list): it
    # has its own tests (test_api.py), not a fuzz run that would wait on it forever.
    operations = [o for o in (r.ok() for r in api_schema.get_all_operations()) if o.path != NEVER_ENDS]
    assert len(operations) >= 30
    calls = []

    for operation in operations:
        strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE) | operation.as_strategy(
            generation_mode=schemathesis.GenerationMode.NEGATIVE
        )

        @given(case=strategy)
        @hypothesis_settings(
            max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def fuzz(case):
            response = case.call_and_validate(
                headers={"Host": "127.0.0.1:8000"}, excluded_checks=excluded, additional_checks=[no_server_error]
            )
            calls.append(response.status_code)

        fuzz()
    assert len(calls) >= len(operations) * 5


def test_answers_that_name_a_job_or_a_model_link_to_what_can_be_done_with_it(tmp_path):
    with TestClient(create_app(Settings(data_dir=tmp_path)), base_url="http://127.0.0.1:8000") as client:
        document = client.get("/openapi.json").json()
    operations = {op["operationId"]: op for path in document["paths"].values() for op in path.values()}
    assert len(operations) == sum(len(path) for path in document["paths"].values())  # each id once
    links = document["paths"]["/lora-finetune"]["post"]["responses"]["202"]["links"]
    assert links["cancel_job"]["parameters"] == {"job_id": "$response.body#/job_id"}
    assert links["get_model"]["parameters"] == {"model_id": "$response.body#/model_id"}
    every = [
        link for op in operations.values() for r in op["responses"].values() for link in r.get("links", {}).values()
    ]
    assert every and all(link["operationId"] in operations for link in every)


def test_every_parameter_is_described_as_readme_describes_it(tmp_path):
    """The dashboard shows each parameter's meaning from the OpenAPI document; README's table and
    PARAMETER_HELP name the same parameters, all of them."""
    import re
    from pathlib import Path

    from mlx_lora_api.types import PARAMETER_HELP, Parameters

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme[readme.index("| parameter | default | meaning |") :].split("\n\n")[0]
    in_readme = {name for row in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", row.split(" | ")[0])}
    assert in_readme == set(Parameters.__struct_fields__) == set(PARAMETER_HELP)
    with TestClient(create_app(Settings(data_dir=tmp_path)), base_url="http://127.0.0.1:8000") as client:
        schema = client.get("/openapi.json").json()["components"]["schemas"]["Parameters"]["properties"]
    assert all(schema[name]["description"] == PARAMETER_HELP[name] for name in PARAMETER_HELP)
    assert schema["rank"]["default"] == 8
