"""Hooks for the stateful schemathesis run (`test_fuzz_stateful.py`), loaded by its CLI through
`SCHEMATHESIS_HOOKS`."""

import schemathesis
from schemathesis.core.parameters import ParameterLocation

BASE = "tiny-base"  # the run's one base model
# The 503s the service means: the Hub out of reach (the tests point it at a closed port), and no
# Hub token on the server for a push. Any other 5xx is a defect.
MEANT_503 = ("the Hub cannot be reached", "this server has no Hugging Face token")


@schemathesis.check
def no_server_error_but_the_meant_ones(ctx, response, case):
    if response.status_code >= 500:
        meant = response.status_code == 503 and any(m in response.text for m in MEANT_503)
        assert meant, f"server error {response.status_code}: {response.text[:300]}"


@schemathesis.hook
def map_case(context, case):
    """Fine-tunes and fuses start from the run's base, so that jobs and models really come to be (a
    random `base_model` only ever finds 404); `?wait` gets a 1 s timeout, as it blocks behind every
    job queued before it. Only where the part was generated valid: a negative case stays invalid."""
    negative = case.meta.is_negative_at if case.meta else (lambda location: False)
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("base_model"), str) and not negative(ParameterLocation.BODY):
        case.body = {**body, "base_model": BASE}
    if case.query and "wait" in case.query and not negative(ParameterLocation.QUERY):
        case.query = {**case.query, "timeout": 1}
    return case


@schemathesis.hook
def filter_case(context, case):
    """The base is the run's fixture: deleting it would end every scenario after it."""
    return not (case.method == "DELETE" and (case.path_parameters or {}).get("model_id") == BASE)
