"""Schemathesis against the live OpenAPI schema of the real server, on SQLite and on Postgres:
every operation, schema-valid and schema-invalid input, with the admin token (agent operations with
an agent token). No answer may be a 5xx, and every answer must be what the schema declares (status
code, content type, body schema, headers). Authenticated operations that succeed are probed again
without a token and with a wrong one, which must be refused.

Bounded and deterministic: a fixed seed, derandomized generation, at most `FUZZ_EXAMPLES` random
cases (valid and invalid) per operation in the fuzzing phase, plus the schema's examples and the
coverage phase's boundary and missing-or-malformed cases. `LATFARM_FUZZ_EXAMPLES` and
`LATFARM_FUZZ_SEED` run it longer or differently. Run with `-s` to see how many operations and cases it ran.

The fuzzer writes to the session's server (devices, tokens, agents, jobs, measurements with
made-up names), so tests that run after it on the same server must not count on an exact state.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from schemathesis import Case
from schemathesis.config import SchemathesisConfig

from tests.helpers import ADMIN_TOKEN

FUZZ_EXAMPLES = int(os.environ.get("LATFARM_FUZZ_EXAMPLES", "15"))
FUZZ_SEED = int(os.environ.get("LATFARM_FUZZ_SEED", "20240601"))
#: operations called by agents: fuzzed with an agent token, so that they get past authorisation
AGENT_OPERATIONS = r"^/api/v1/(agents/me/jobs/next|jobs/\{job_id\}/(heartbeat|result))$"
LONG_POLL = "GET /api/v1/agents/me/jobs/next"
#: a long poll waits up to `wait` (at most 120) seconds for a job; longer waits are cut to this
LONG_POLL_WAIT_S = 0.5

#: cases sent, by operation and by phase and mode, for the run in progress
CASES: Counter[str] = Counter()
KINDS: Counter[str] = Counter()


@pytest.fixture(scope="module")
def agent_token(server_url: str) -> str:
    body = {"name": "fuzz-agent", "devices": [{"name": "fuzz-agent-device"}],
            "capabilities": {"hostname": "fuzz", "cpu_model": "fuzz", "cpu_cores": 1, "memory_bytes": 1,
                             "os": "linux", "python": "3", "agent_version": "0"}}
    response = httpx.post(f"{server_url}/api/v1/agents/register", json=body,
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 201, response.text
    return response.json()["agent_token"]


@pytest.fixture(scope="module")
def fuzz_schema(server_url: str, agent_token: str) -> Iterator[schemathesis.BaseSchema]:
    config = SchemathesisConfig.from_dict({
        "seed": FUZZ_SEED,
        "headers": {"Authorization": f"Bearer {ADMIN_TOKEN}"},
        "request-timeout": 60,
        "generation": {"max-examples": FUZZ_EXAMPLES, "mode": "all", "deterministic": True, "database": "none"},
        # operations one at a time; sequences of calls (the stateful phase) are not run
        "phases": {"stateful": {"enabled": False}},
        "checks": {
            # The server validates more than JSON Schema can say (known space names, the grammar of
            # an architecture key, ONNX bytes, names that exist): schema-valid input may get a 4xx.
            "positive_data_acceptance": {"enabled": False},
            # pydantic's lax mode coerces (false or "1" for an integer): some schema-invalid input
            # is accepted. Schema-invalid input is still sent, and must get no 5xx.
            "negative_data_rejection": {"enabled": False},
            # `/devices/{name:path}` takes names with slashes, so e.g. PATCH /devices/x/onboard is a
            # PATCH of the device "x/onboard" (a 404 or 422), not an undeclared method (405).
            "unsupported_method": {"enabled": False},
            # Starlette's 405 lists the methods of the first route whose path matches only
            # (`Allow: GET` for /devices, which takes POST too): a limitation of the framework.
            "allow_header_conformance": {"enabled": False},
        },
        "operations": [
            # pre-trains a predictor on every imported reference device before it answers (minutes)
            {"include-name": "POST /api/v1/predictors/pretrain", "enabled": False},
            {"include-path-regex": AGENT_OPERATIONS, "headers": {"Authorization": f"Bearer {agent_token}"}},
        ],
    })
    CASES.clear()
    KINDS.clear()
    yield schemathesis.openapi.from_url(f"{server_url}/openapi.json", config=config)
    print(f"\nschemathesis {schemathesis.__version__} against {server_url}: {len(CASES)} operations, "
          f"{sum(CASES.values())} cases ({', '.join(f'{n} {kind}' for kind, n in sorted(KINDS.items()))})")
    for label, count in sorted(CASES.items(), key=lambda item: item[0].split()[::-1]):
        print(f"  {count:5d}  {label}")


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@pytest.fixture(autouse=True)
def _legacy_nodeid(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32 renames the test node per operation through `Node._nodeid`, which pytest
    9.2 no longer has (it keeps `Node._id`): without one, the test fails before it starts."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@pytest.mark.slow
@schema.parametrize()
def test_api_conforms_to_its_schema(case: Case) -> None:
    if case.operation.label == LONG_POLL and isinstance(case.query, dict):
        try:
            wait = float(case.query["wait"])
        except (KeyError, TypeError, ValueError):
            wait = None
        if wait is not None and LONG_POLL_WAIT_S < wait <= 120:
            case.query["wait"] = LONG_POLL_WAIT_S
    CASES[case.operation.label] += 1
    if case.meta is not None:
        KINDS[f"{case.meta.phase.name.value} {case.meta.generation.mode.value}"] += 1
    case.call_and_validate()
