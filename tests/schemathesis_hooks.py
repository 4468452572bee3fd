"""Hooks for the stateful schemathesis run (`test_fuzz_stateful.py`), loaded by its CLI through
`SCHEMATHESIS_HOOKS`."""

import schemathesis

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
def map_body(context, body):
    """Fine-tunes and fuses start from the run's base, so that jobs and models really come to be
    (a random `base_model` only ever finds 404)."""
    if isinstance(body, dict) and isinstance(body.get("base_model"), str):
        body = {**body, "base_model": BASE}
    return body


@schemathesis.hook
def map_query(context, query):
    """`?wait` blocks until the job ends, behind every job queued before it: a short timeout keeps
    each request under the client's own."""
    if query and "wait" in query:
        query = {**query, "timeout": 1}
    return query


@schemathesis.hook
def filter_case(context, case):
    """The base is the run's fixture: deleting it would end every scenario after it."""
    return not (case.method == "DELETE" and (case.path_parameters or {}).get("model_id") == BASE)
