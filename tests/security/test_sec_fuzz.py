"""Property-based fuzzing of the agent API with schemathesis: no generated request gets a 5xx.

The gateway serves no OpenAPI document (``openapi_url=None``: nothing to browse for an attacker),
so the schema is built here from the same routers (``routes.build_router()``). Requests go over
real TLS to the real gateway, with a registered agent's client certificate, through a ``requests``
session (what ``Case.call`` uses). Both schema-valid and schema-violating data are generated,
deterministically, with a small example budget per operation to keep the run short.

Left out: ``DELETE /agents/v1/self`` (it would unregister the fuzzing agent after one call; its
refusals are covered in test_sec_transport.py and test_sec_lifecycle.py). Long-polls are shortened
to 0.2 s so a generated ``wait_seconds`` cannot hold the run.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from secsupport import enroll

from edge_agent.protocol import LEASE_PATH, MAX_LEASE_WAIT_SECONDS, SELF_PATH
from executor_plugin.gateway.routes import build_router

MAX_EXAMPLES = 25


def agent_api_openapi() -> dict:
    """The agent API's OpenAPI document, from the gateway's own routers."""
    app = FastAPI(title="edge-agent agent API")
    app.include_router(build_router())
    return app.openapi()


schema = schemathesis.openapi.from_dict(agent_api_openapi()).exclude(method="DELETE", path=SELF_PATH)
schema.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
    max_examples=MAX_EXAMPLES,
    deterministic=True,
    database="none",
)


@pytest.fixture(scope="module")
def fuzz_session(gateway, tmp_path_factory) -> Iterator[requests.Session]:
    agent = enroll(gateway, tmp_path_factory.mktemp("fuzz"))  # on a queue of its own: nothing to lease
    session = requests.Session()
    session.cert = (str(agent.cert_file), str(agent.key_file))
    session.verify = str(gateway.home.path / "ca" / "ca.pem")
    yield session
    session.close()


def test_the_schema_covers_every_agent_route():
    paths = set(agent_api_openapi()["paths"])
    assert {
        "/agents/v1/trust-bundle", "/agents/v1/register", "/agents/v1/whoami", "/agents/v1/lease",
        "/agents/v1/heartbeat", "/agents/v1/jobs/{job_id}/state", "/agents/v1/jobs/{job_id}/logs",
    } <= paths


def _shorten_long_polls(case) -> None:
    """Any wait the gateway would accept (a number, a numeric string, or none: 30 s) becomes 0.2 s."""
    body = case.body
    if case.path != LEASE_PATH or not isinstance(body, dict):
        return
    wait = body.get("wait_seconds", 30.0)
    if isinstance(wait, bool):
        return
    try:
        seconds = float(wait)
    except (TypeError, ValueError):
        return
    if 0 <= seconds <= MAX_LEASE_WAIT_SECONDS:
        body["wait_seconds"] = min(seconds, 0.2)


@schema.parametrize()
@settings(
    deadline=None, suppress_health_check=list(HealthCheck), max_examples=MAX_EXAMPLES, derandomize=True, database=None
)
def test_agent_api_never_answers_5xx(case, gateway, fuzz_session):
    _shorten_long_polls(case)
    # verify and cert given per call too: schemathesis passes its own verify=True, which would
    # override the session's and check our CA against the system store.
    response = case.call(
        base_url=gateway.url, session=fuzz_session, timeout=60, verify=fuzz_session.verify, cert=fuzz_session.cert
    )
    case.validate_response(response, checks=[not_a_server_error])
    assert gateway.proc.poll() is None, gateway.log_text()
