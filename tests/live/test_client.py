"""The public client, `latfarm.FarmClient`, against a real server (its answers, its errors, its
waits with a real agent) and held to the server's OpenAPI document."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest
from pydantic import BaseModel

from latfarm import (
    Conflict,
    FarmClient,
    InvalidRequest,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
    models,
)
from latfarm.models import Predictor
from server.cli.local import running_agent, running_server
from server.db import make_engine, make_session_factory, session_scope, upgrade
from server.services.datasets import import_datasets
from server.settings import Settings
from tests.helpers import ADMIN_TOKEN, DATASETS, REPO, onboarding_jobs, wait_until

REFERENCE_DEVICES = ["pixel3", "raspi4", "titan_rtx_1"]
KEYS = ["|nor_conv_1x1~0|+|skip_connect~0|nor_conv_3x3~1|+|skip_connect~0|avg_pool_3x3~1|nor_conv_1x1~2|",
        "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|nor_conv_3x3~2|"]


# --------------------------------------------------------------------------- against a real server


@pytest.fixture
def farm(server_url: str) -> Any:
    with FarmClient(server_url, ADMIN_TOKEN) as client:
        yield client


def test_errors_are_typed_by_status(farm: FarmClient, api: httpx.Client, server_url: str) -> None:
    with pytest.raises(NotFound) as missing:
        farm.device("no-such-device")
    assert missing.value.status_code == 404 and "no-such-device" in missing.value.detail

    lonely = "client-lonely"
    if api.get(f"/devices/{lonely}").status_code == 404:
        assert api.post("/devices", json={"name": lonely}).status_code == 201
    with pytest.raises(Conflict) as unserved:
        farm.predict(lonely, "nb201", KEYS)
    assert unserved.value.status_code == 409 and unserved.value.field == "device"
    assert "no predictor serves" in unserved.value.detail

    with pytest.raises(InvalidRequest) as invalid:
        farm.submit(lonely, "nb201", ["not-an-nb201-key"])
    assert invalid.value.status_code == 422 and invalid.value.field

    with FarmClient(server_url, "wrong-token") as stranger, pytest.raises(Unauthorized) as refused:
        stranger.devices()
    assert refused.value.status_code == 401

    assert lonely in {device.name for device in farm.devices()}
    assert farm.device(lonely).agents == []
    [queued] = farm.submit(lonely, "nb201", KEYS[:1], force=True)  # no agent serves it: it waits
    assert queued.status == "queued" and queued.queue_position is not None
    assert farm.cancel(queued.id).status == "cancelled" and farm.job(queued.id).finished
    assert queued.id in {job.id for job in farm.jobs(device=lonely, status="cancelled")}


def test_rate_limit_says_when_to_retry(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'limited.db'}"
    upgrade(url)
    settings = Settings(database_url=url, artifact_dir=tmp_path / "artifacts", admin_token=ADMIN_TOKEN,
                        predict_rate_limit="2/minute")
    with running_server(settings) as server, FarmClient(server, ADMIN_TOKEN) as farm:
        for _ in range(2):
            with pytest.raises(NotFound):
                farm.predict("nowhere", "nb201", "all")
        with pytest.raises(RateLimited) as limited:
            farm.predict("nowhere", "nb201", "all")
    assert limited.value.status_code == 429 and "2 per 1 minute" in limited.value.detail
    assert limited.value.retry_after_s is not None and 1 <= limited.value.retry_after_s <= 60


def test_an_overloaded_server_is_unavailable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'busy.db'}"
    upgrade(url)
    settings = Settings(database_url=url, artifact_dir=tmp_path / "artifacts", admin_token=ADMIN_TOKEN,
                        max_concurrency=2)
    with running_server(settings) as server, FarmClient(server, ADMIN_TOKEN) as farm:
        assert farm.devices() == []  # its connection stays open: one of the two places
        address = httpx.URL(server)
        with socket.create_connection((address.host, address.port)):
            # once the server has taken in the idle connection, a request is one too many
            busy = wait_until(lambda: refusal(farm), 10, 0.05)
        wait_until(lambda: not refusal(farm), 10, 0.05)  # and once it is closed, none is
    assert busy.status_code == 503 and busy.retry_after_s is None


def refusal(farm: FarmClient) -> Unavailable | None:
    try:
        farm.devices()
    except Unavailable as exc:
        return exc
    return None


@pytest.mark.slow
@pytest.mark.timeout(1200)  # a pre-training and real measurements, on a busy 2-core host
def test_nas_loop_with_a_real_agent(tmp_path: Path) -> None:
    """What NAS code does: pre-train and onboard a device served by a real agent, predict keys and
    a whole space, measure a few for real, measure an uploaded ONNX model, run the README's loop.
    A farm of its own (SQLite, the NB201 tables, a base predictor on three reference devices) keeps
    its base predictor from the session's other tests and trains in minutes on this host."""
    if not (DATASETS / "devices.csv").is_file():
        pytest.skip("reference datasets not found")
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'latfarm.db'}", datasets=DATASETS,
                        artifact_dir=tmp_path / "artifacts", admin_token=ADMIN_TOKEN, poll_wait_s=1.0,
                        heartbeat_s=1.0)
    upgrade(settings.database_url)
    with session_scope(make_session_factory(make_engine(settings.database_url))) as session:
        import_datasets(session, DATASETS, spaces=("nb201",))
    device = "client-cpu"
    with running_server(settings) as server_url, FarmClient(server_url, ADMIN_TOKEN) as farm, \
            httpx.Client(base_url=f"{server_url}/api/v1", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as api:
        base = farm.pretrain("nb201", REFERENCE_DEVICES)
        assert base.kind == "base" and sorted(base.training_devices) == sorted(REFERENCE_DEVICES)
        # the agent starts after training, so that its registration canary is not timed beside it
        with running_agent(server_url, ADMIN_TOKEN, device, 1, tmp_path, ["--poll-wait", "1"]):
            run_nas_code(farm, api, server_url, device, base)


def run_nas_code(farm: FarmClient, api: httpx.Client, server_url: str, device: str, base: Predictor) -> None:
    served = farm.wait_for_device(device)
    assert served.name == device and served.agents and served.runtime == "onnxruntime"

    progress: list[tuple[int, int]] = []
    onboarding = farm.onboard(device, "nb201", samples=2, preset="quick", on_progress=lambda *p: progress.append(p))
    jobs = onboarding_jobs(2, [round_.model_dump() for round_ in onboarding.rounds])
    assert onboarding.status == "ready" and onboarding.jobs_total == jobs and onboarding.predictor_id is not None
    assert progress[-1] == (jobs, jobs)
    adapted = farm.predictor(onboarding.predictor_id)
    assert adapted.kind == "adapted" and adapted.device == device and adapted.parent_id == base.id

    explanation = farm.explain(device, "nb201")
    assert explanation.predictor_id == adapted.id
    assert sorted(r.device for r in explanation.resembles) == sorted(REFERENCE_DEVICES)
    assert explanation.op_costs and all(cost.op for cost in explanation.op_costs)

    prediction = farm.predict(device, "nb201", KEYS)
    assert prediction.architectures == KEYS and prediction.predictor_kind == "adapted"
    assert all(ms > 0 for ms in prediction.latency_ms) and len(prediction.uncertainty_ms) == 2
    whole = farm.predict(device, "nb201", "all", prediction.predictor_id)
    assert len(whole.architectures) == 15625
    assert whole.by_architecture()[KEYS[0]] == pytest.approx(prediction.by_architecture()[KEYS[0]])

    measured = list(farm.jobs(onboarding=onboarding.id))
    assert len(measured) == jobs and all(job.status == "done" and job.latency_ms for job in measured), measured
    assert len({job.architecture for job in measured}) == 2  # an untrusted one is measured again
    first = measured[0]
    assert first.architecture is not None and first.artifact_sha256 is not None
    trusted = [job.latency_ms for job in measured if job.architecture == first.architecture and job.valid]
    [again] = farm.submit(device, "nb201", [first.architecture], "quick")
    if not trusted:  # every run flagged unstable or drift (a busy host): measured again
        assert not again.reused
    else:
        assert again.reused and again.finished and again.latency_ms in trusted

    model = api.get(f"/artifacts/{first.artifact_sha256}").content
    artifact = farm.upload_artifact(model)
    assert artifact.sha256 == first.artifact_sha256 and artifact.size_bytes == len(model)
    [by_upload] = farm.wait_for_jobs([farm.submit_artifact(device, artifact.sha256, "quick", force=True)])
    assert by_upload.status == "done" and by_upload.latency_ms and not by_upload.reused

    # measure() is submit + wait_for_jobs: the README's loop measures three architectures with it
    printed = run_readme_loop(server_url, device)
    assert len(printed) == 3 and all(line.split()[1] == "done" and float(line.split()[2]) > 0 for line in printed)
    with pytest.raises(InvalidRequest) as not_onnx:
        farm.upload_artifact(b"not an onnx model")
    assert not_onnx.value.status_code == 422 and "not a valid ONNX model" in not_onnx.value.detail


def run_readme_loop(server_url: str, device: str) -> list[str]:
    """The README's NAS loop, run as written but against this farm (and with no latency budget:
    this host's speed is not known): the lines it prints."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## NAS client"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]
    code = (code.replace('"http://farm:8000"', repr(server_url)).replace('token="..."', f"token={ADMIN_TOKEN!r}")
            .replace('"rpi4-ort-1t-b1"', repr(device)).replace('"nb201", 5.0', '"nb201", float("inf")'))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


# --------------------------------------------------------------------------- held to the OpenAPI document

#: each answer model of the client and the server's response schema it reads
ANSWERS: dict[type[BaseModel], str] = {
    models.Device: "DeviceOut", models.Artifact: "ArtifactOut", models.Job: "JobOut", models.Prediction: "PredictOut",
    models.Predictor: "PredictorOut", models.Onboarding: "OnboardingOut", models.OnboardingRound: "OnboardingRound",
    models.Task: "TaskOut", models.Explanation: "ExplainOut", models.Resemblance: "Resemblance",
    models.OpCost: "OpCost", models.Space: "SpaceOut",
}


def test_client_models_match_the_servers_schema(anonymous: httpx.Client, server_url: str) -> None:
    document = httpx.get(f"{server_url}/openapi.json").json()
    schemas = document["components"]["schemas"]

    def enum_of(prop: dict[str, Any]) -> set[str] | None:
        options = prop.get("anyOf", [prop])
        for option in options:
            if "$ref" in option:
                option = schemas[option["$ref"].rpartition("/")[2]]
            if "enum" in option:
                return set(option["enum"])
        return None

    for model, name in ANSWERS.items():
        server = schemas[name]["properties"]
        assert set(model.model_fields) == set(server), (model.__name__, set(model.model_fields) ^ set(server))
        for field, info in model.model_fields.items():
            literal = {arg for arg in get_args(info.annotation) if isinstance(arg, str)}
            if literal:
                assert literal == enum_of(server[field]), (model.__name__, field)
