"""The OpenAPI document is valid, and a client generated from it (openapi-python-client) works
against the real server: typed answers and errors parse, and an ONNX model uploads."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType

import httpx
import pytest
from openapi_spec_validator import validate

from tests.helpers import ADMIN_TOKEN, tiny_onnx

GENERATED = "latfarm_generated_api"


@pytest.fixture(scope="module")
def document(server_url: str) -> dict:
    return httpx.get(f"{server_url}/openapi.json").json()


def test_schema_validates(document: dict) -> None:
    validate(document)
    upload = document["paths"]["/api/v1/artifacts"]["post"]["requestBody"]
    assert upload["required"] and upload["content"]["application/octet-stream"]["schema"]["format"] == "binary"


@pytest.fixture(scope="module")
def generated(document: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The client package openapi-python-client generates from the live document, imported."""
    root = tmp_path_factory.mktemp("generated")
    (root / "openapi.json").write_text(json.dumps(document))
    done = subprocess.run([sys.executable, "-m", "openapi_python_client", "generate", "--path", "openapi.json",
                           "--meta", "none", "--output-path", GENERATED], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stdout, done.stdout  # e.g. "Endpoint will not be generated"
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(GENERATED)
    finally:
        sys.path.remove(str(root))
        for name in [name for name in sys.modules if name.split(".")[0] == GENERATED]:
            del sys.modules[name]


def operation(package: ModuleType, tag: str, name: str) -> ModuleType:
    return importlib.import_module(f"{package.__name__}.api.{tag}.{name}")


def test_generated_client_parses_answers_and_errors(generated: ModuleType, server_url: str) -> None:
    models = importlib.import_module(f"{GENERATED}.models")
    types = importlib.import_module(f"{GENERATED}.types")
    client = generated.AuthenticatedClient(base_url=server_url, token=ADMIN_TOKEN)

    name = "generated-client-device"
    create = operation(generated, "devices", "create_device_api_v1_devices_post")
    body = models.DeviceIn(name=name, hardware="made by a generated client")
    created = create.sync_detailed(client=client, body=body)
    assert created.status_code == 201, created.content
    read = operation(generated, "devices", "read_device_api_v1_devices_name_get")
    device = read.sync(name, client=client)
    assert isinstance(device, models.DeviceOut) and device.name == name
    assert isinstance(device.state, models.DeviceState) and device.hardware == "made by a generated client"

    missing = read.sync("no-such-device", client=client)
    assert isinstance(missing, models.Error) and "no-such-device" in missing.detail

    submit = operation(generated, "jobs", "submit_job_api_v1_jobs_post")
    invalid = submit.sync(client=client, body=models.JobIn(device=name, space="nb201", architecture="not-a-key"))
    assert isinstance(invalid, models.Error) and invalid.field, invalid

    upload = operation(generated, "artifacts", "upload_artifact_api_v1_artifacts_post")
    data = tiny_onnx()
    artifact = upload.sync(client=client, body=types.File(payload=io.BytesIO(data)))
    assert isinstance(artifact, models.ArtifactOut), artifact
    assert artifact.sha256 == hashlib.sha256(data).hexdigest() and artifact.size_bytes == len(data)
    refused = upload.sync(client=client, body=types.File(payload=io.BytesIO(b"not onnx")))
    assert isinstance(refused, models.Error) and "not a valid ONNX model" in refused.detail

    job = submit.sync(client=client,
                      body=models.JobIn(device=name, artifact=artifact.sha256, preset=models.Preset.QUICK))
    assert isinstance(job, models.JobOut) and job.artifact_sha256 == artifact.sha256
    assert job.status == models.JobStatus.QUEUED and job.created_at.tzinfo is not None
    cancel = operation(generated, "jobs", "cancel_job_api_v1_jobs_job_id_cancel_post")
    cancelled = cancel.sync(job.id, client=client)
    assert isinstance(cancelled, models.JobOut) and cancelled.status == models.JobStatus.CANCELLED

    stranger = generated.AuthenticatedClient(base_url=server_url, token="wrong")
    unauthorised = read.sync_detailed(name, client=stranger)
    assert unauthorised.status_code == 401 and isinstance(unauthorised.parsed, models.Error)
