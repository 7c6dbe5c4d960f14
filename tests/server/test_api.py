"""The HTTP API in process (tests/server/conftest.py), on SQLite and on Postgres."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, event, select
from sqlalchemy.orm import Session

from server.db import make_engine
from server.models import Device
from server.settings import Settings
from tests.helpers import NB201_KEY, assert_json_error, tiny_onnx


def test_healthz(root: httpx.Client) -> None:
    assert root.get("/healthz").json()["status"] == "ok"


def test_openapi_docs_served(root: httpx.Client) -> None:
    schema = root.get("/openapi.json").json()
    assert "/api/v1/predict" in schema["paths"]
    assert root.get("/docs").status_code == 200


def test_device_lifecycle(api: httpx.Client) -> None:
    created = api.post("/devices", json={"name": "lifecycle-dev", "hardware": "test board", "threads": 2})
    assert created.status_code == 201, created.text
    assert created.json()["state"] == "offline"
    assert_json_error(api.post("/devices", json={"name": "lifecycle-dev"}), 409, "name")
    patched = api.patch("/devices/lifecycle-dev", json={"state": "paused"})
    assert patched.json()["state"] == "paused"
    assert api.delete("/devices/lifecycle-dev").status_code == 204
    assert_json_error(api.get("/devices/lifecycle-dev"), 404, "name")


def test_architecture_is_canonicalised_and_idempotent(api: httpx.Client) -> None:
    arch = {"r": 176, "ks": [3, 5, 7, 3] * 5, "e": [4, 6, 3, 4] * 5, "d": [2, 3, 4, 3, 2]}
    loose = json.dumps(arch, indent=2)  # valid, but not the canonical spelling
    first = api.post("/architectures", json={"space": "ofa", "key": loose})
    again = api.post("/architectures", json={"space": "ofa", "key": json.dumps(arch)})
    assert first.status_code == 201 and again.status_code == 200, (first.text, again.text)
    assert first.json()["id"] == again.json()["id"]
    assert first.json()["key"] == json.dumps(dict(sorted(arch.items())), separators=(",", ":"))


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        ("post", "/predict", {"device": "x", "space": "nope", "architectures": "all"}, 422, "space"),
        ("post", "/architectures", {"space": "nope", "key": "k"}, 422, "space"),
        ("post", "/architectures", {"space": "nb201", "key": "|conv~0|"}, 422, "key"),
        ("post", "/architectures", {"space": "fbnet", "key": "k3_e1|skip"}, 422, "key"),
        ("post", "/architectures", {"space": "ofa", "key": "{\"ks\": 3}"}, 422, "key"),
        ("post", "/predict", {"device": "no-such-device", "space": "nb201", "architectures": "all"}, 404, "device"),
        ("post", "/jobs", {"device": "no-such-device", "space": "nb201", "architecture": NB201_KEY}, 404, "device"),
        ("post", "/jobs", {"device": "x", "space": "nb201"}, 422, "body"),
        ("post", "/measurements", {"device": "no-such-device", "space": "nb201",
                                   "rows": [{"architecture": NB201_KEY, "latency_ms": 1.0}]}, 404, "device"),
        ("post", "/measurements", {"device": "x", "space": "nb201",
                                   "rows": [{"architecture": NB201_KEY, "latency_ms": -1.0}]}, 422, "latency_ms"),
        ("post", "/measurements", {"device": "x", "space": "nb201", "rows": []}, 422, "rows"),
        ("get", "/measurements?space=nb201&architecture=garbage", None, 422, "architecture"),
        ("get", "/devices/no-such-device", None, 404, "name"),
        ("get", "/jobs/987654", None, 404, "job_id"),
        ("get", "/artifacts/not-a-sha", None, 422, "sha256"),
        ("post", "/devices", {"name": "long-precision", "precision": "x" * 17}, 422, "precision"),
        ("patch", "/devices/no-such-device", {"hardware": "x" * 257}, 422, "hardware"),
    ],
)
def test_bad_input_gets_a_4xx_json_error(api: httpx.Client, method: str, path: str, body: dict | None,
                                          status: int, field: str | None) -> None:
    assert_json_error(api.request(method, path, json=body), status, field)


def test_nan_latency_is_rejected(api: httpx.Client) -> None:
    api.post("/devices", json={"name": "nan-dev"})
    # json.dumps writes the NaN literal that strict JSON forbids
    payload = json.dumps({"device": "nan-dev", "space": "nb201",
                          "rows": [{"architecture": NB201_KEY, "latency_ms": float("nan")}]})
    response = api.post("/measurements", content=payload, headers={"content-type": "application/json"})
    assert_json_error(response, 422, "latency_ms")


def test_malformed_json_is_a_4xx(api: httpx.Client) -> None:
    response = api.post("/devices", content=b"{not json", headers={"content-type": "application/json"})
    assert_json_error(response, 422)


def test_oversized_body_is_413(api: httpx.Client) -> None:
    rows = [{"architecture": NB201_KEY, "latency_ms": 1.0}] * 60_000  # > 2 MiB limit of the test server
    assert_json_error(api.post("/measurements", json={"device": "x", "space": "nb201", "rows": rows}), 413)


def test_oversized_chunked_body_is_413(api: httpx.Client) -> None:
    chunks = (b"x" * 65536 for _ in range(64))  # 4 MiB without a Content-Length
    assert_json_error(api.post("/artifacts", content=chunks), 413)


def test_measurement_import_and_query(api: httpx.Client) -> None:
    api.post("/devices", json={"name": "import-dev"})
    other = "|skip_connect~0|+|none~0|skip_connect~1|+|none~0|none~1|nor_conv_1x1~2|"
    rows = [{"architecture": NB201_KEY, "latency_ms": 2.5}, {"architecture": other, "latency_ms": 1.25}]
    summary = api.post("/measurements", json={"device": "import-dev", "space": "nb201", "rows": rows})
    assert summary.status_code == 201, summary.text
    assert summary.json()["inserted"] == 2
    page = api.get("/measurements", params={"device": "import-dev", "space": "nb201"}).json()
    assert sorted(item["latency_ms"] for item in page["items"]) == [1.25, 2.5]
    one = api.get("/measurements", params={"device": "import-dev", "space": "nb201", "architecture": other}).json()
    assert [item["latency_ms"] for item in one["items"]] == [1.25]
    csv_text = api.get("/measurements", params={"device": "import-dev", "format": "csv"}).text
    assert csv_text.splitlines()[0].startswith("id,device,space,architecture,latency_ms")
    assert len(csv_text.splitlines()) == 3


def test_artifact_upload_is_checked_and_content_addressed(api: httpx.Client) -> None:
    assert_json_error(api.post("/artifacts", content=b"definitely not onnx"), 422, "body")
    data = tiny_onnx()
    uploaded = api.post("/artifacts", content=data)
    assert uploaded.status_code == 201, uploaded.text
    sha = uploaded.json()["sha256"]
    assert api.get(f"/artifacts/{sha}").content == data
    assert_json_error(api.get(f"/artifacts/{'0' * 64}"), 404)


def test_registration_needs_a_valid_token(api: httpx.Client, anonymous: httpx.Client) -> None:
    body = {"name": "a", "devices": [{"name": "reg-dev"}], "capabilities": {
        "hostname": "h", "cpu_model": "c", "cpu_cores": 1, "memory_bytes": 1, "os": "linux", "python": "3",
        "agent_version": "0"}}
    assert_json_error(anonymous.post("/agents/register", json=body), 401)
    assert_json_error(anonymous.post("/agents/register", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    token = api.post("/agents/registration-tokens").json()["token"]
    registered = anonymous.post("/agents/register", json=body, headers={"Authorization": f"Bearer {token}"})
    assert registered.status_code == 201
    # one-time: the same token cannot register a second agent
    assert_json_error(anonymous.post("/agents/register", json=body, headers={"Authorization": f"Bearer {token}"}), 401)
    assert_json_error(anonymous.get("/agents/me/jobs/next", headers={"Authorization": "Bearer nope"}), 401)
    # an agent that restarts presents its own token and stays the same agent
    agent_token = registered.json()["agent_token"]
    again = anonymous.post("/agents/register", json=body, headers={"Authorization": f"Bearer {agent_token}"})
    assert again.status_code == 201
    assert again.json()["agent_id"] == registered.json()["agent_id"] and again.json()["agent_token"] == agent_token


def test_a_test_writes_inside_a_transaction_that_is_rolled_back(api: httpx.Client, settings: Settings) -> None:
    """What the in-process tier promises: another connection never sees a test's writes."""
    assert api.post("/devices", json={"name": "rolled-back-dev"}).status_code == 201
    assert api.get("/devices/rolled-back-dev").status_code == 200
    outside = make_engine(settings.database_url)
    try:
        with outside.connect() as connection:
            assert connection.scalar(select(Device.id).where(Device.name == "rolled-back-dev")) is None
    finally:
        outside.dispose()


def test_spaces_lists_every_installed_space_with_what_it_offers(api: httpx.Client, anonymous: httpx.Client,
                                                                connection: Connection) -> None:
    assert_json_error(anonymous.get("/spaces"), 401)
    # an imported reference device, as `latfarm datasets import` records one (a table per space)
    with Session(bind=connection, join_transaction_mode="create_savepoint") as session:
        session.add(Device(name="spaces-ref-dev", source="imported", attributes={"spaces": {"fbnet": {}, "nb201": {}}}))
        session.commit()
    answer = api.get("/spaces")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["next_cursor"] is None
    spaces = {item["name"]: item for item in body["items"]}
    assert {"nb201", "fbnet", "ofa", "onnx"} <= set(spaces)
    nb201, ofa, onnx = spaces["nb201"], spaces["ofa"], spaces["onnx"]
    assert nb201["size"] == 15_625 and nb201["has_reference_tables"] and nb201["builds_networks"]
    assert not nb201["graph_encoded"]
    # the session's database may hold base predictors from other tests: the newest one is named
    bases = [p["id"] for p in api.get("/predictors", params={"space": "nb201", "limit": 1000}).json()["items"]
             if p["kind"] == "base"]
    assert nb201["base_predictor_id"] == (max(bases) if bases else None)
    assert "spaces-ref-dev" in nb201["reference_devices"] and "spaces-ref-dev" not in ofa["reference_devices"]
    # the example key is a key of the space
    for name in ("nb201", "fbnet", "ofa"):
        created = api.post("/architectures", json={"space": name, "key": spaces[name]["example_key"]})
        assert created.status_code in (200, 201), created.text  # 200: the session's import holds it already
        assert created.json()["key"] == spaces[name]["example_key"]
    assert onnx["size"] is None and onnx["example_key"] is None and "sha256" in onnx["key_format"]
    assert onnx["graph_encoded"] and not onnx["builds_networks"] and not onnx["has_reference_tables"]
    # a graph-encoded space pre-trains on the reference spaces' devices
    assert "spaces-ref-dev" in onnx["reference_devices"]


def test_a_page_of_devices_reads_their_agents_in_the_query_that_loads_them(
        api: httpx.Client, anonymous: httpx.Client, connection: Connection) -> None:
    """Listing devices loads each device's agents with the devices, not one query per device
    inside the response's validation (where a database that went away answered 500, not 503)."""
    capabilities = {"hostname": "h", "cpu_model": "c", "cpu_cores": 1, "memory_bytes": 1, "os": "linux",
                    "python": "3", "agent_version": "0"}
    for i in range(6):
        token = api.post("/agents/registration-tokens").json()["token"]
        body = {"name": f"lister-{i}", "devices": [{"name": f"listed-{i}"}], "capabilities": capabilities}
        assert anonymous.post("/agents/register", json=body,
                              headers={"Authorization": f"Bearer {token}"}).status_code == 201
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(connection, "before_cursor_execute", count)
    try:
        listed = api.get("/devices").json()["items"]
    finally:
        event.remove(connection, "before_cursor_execute", count)
    assert {device["name"] for device in listed} >= {f"listed-{i}" for i in range(6)}
    assert all(device["agents"] for device in listed if device["name"].startswith("listed-"))
    agent_reads = [s for s in statements if "agents" in s and "agent_devices" in s]
    assert len(agent_reads) == 1, agent_reads
