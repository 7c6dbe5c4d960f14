"""End to end: a real agent process measures real ONNX models for a real server."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from server.cli.local import running_agent
from server.settings import Settings
from tests.helpers import ADMIN_TOKEN, onboarding_jobs, pretrained, registered, wait_until

NB201_KEY = "|nor_conv_1x1~0|+|skip_connect~0|nor_conv_3x3~1|+|skip_connect~0|avg_pool_3x3~1|nor_conv_1x1~2|"


def test_agent_measures_a_real_nb201_model(server_url: str, api: httpx.Client, tmp_path: Path) -> None:
    device = f"e2e-cpu-{tmp_path.name[-8:]}"
    with running_agent(server_url, ADMIN_TOKEN, device, 1, tmp_path, ["--poll-wait", "1"]) as agent:
        info = wait_until(lambda: registered(api, device), 60)
        assert info["runtime"] == "onnxruntime" and info["threads"] == 1
        job = api.post("/jobs", json={"device": device, "space": "nb201", "architecture": NB201_KEY,
                                      "preset": "quick"})
        assert job.status_code == 201, job.text
        job_id = job.json()["id"]
        done = wait_until(lambda: (j := api.get(f"/jobs/{job_id}").json())["status"] in ("done", "failed") and j)
        assert agent.poll() is None, "the agent exited"
    assert done["status"] == "done", done
    assert done["artifact_sha256"] and done["latency_ms"] > 0

    page = api.get("/measurements", params={"device": device, "space": "nb201", "architecture": NB201_KEY}).json()
    [measurement] = page["items"]
    assert measurement["job_id"] == job_id
    stats = measurement["stats"]
    assert stats["n"] >= 15 and stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
    assert measurement["latency_ms"] == stats["median_ms"]
    provenance = measurement["provenance"]
    assert provenance["artifact_sha256"] == done["artifact_sha256"]
    assert provenance["threads"] == 1 and "onnxruntime" in str(provenance["runtime"])
    # the artifact the agent ran is the server's, byte for byte, and a real ONNX model
    artifact = api.get(f"/artifacts/{done['artifact_sha256']}").content
    import hashlib

    import onnx

    assert hashlib.sha256(artifact).hexdigest() == done["artifact_sha256"]
    onnx.checker.check_model(onnx.load_from_string(artifact))


@pytest.mark.slow
def test_onboarding_adapts_a_predictor_from_real_measurements(imported, server_url: str, api: httpx.Client,
                                                             tmp_path: Path) -> None:
    pretrained(api)
    device = f"onboard-cpu-{tmp_path.name[-8:]}"
    with running_agent(server_url, ADMIN_TOKEN, device, 1, tmp_path, ["--poll-wait", "1"]):
        wait_until(lambda: registered(api, device), 60)
        started = api.post(f"/devices/{device}/onboard", json={"space": "nb201", "samples": 6, "preset": "quick"})
        assert started.status_code == 202, started.text
        onboarding_id = started.json()["id"]
        assert started.json()["jobs_total"] == 6
        final = wait_until(
            lambda: (o := api.get(f"/onboardings/{onboarding_id}").json())["status"] in ("ready", "failed") and o, 300
        )
    assert final["status"] == "ready", final
    assert final["jobs_done"] == onboarding_jobs(6, final["rounds"])
    predictors = api.get("/predictors", params={"space": "nb201"}).json()["items"]
    adapted = next(p for p in predictors if p["id"] == final["predictor_id"])
    assert adapted["kind"] == "adapted" and adapted["device"] == device and adapted["parent_id"] is not None
    # measurements flagged unstable or drift are kept but not trained on (one sample per architecture)
    jobs = api.get("/jobs", params={"onboarding": onboarding_id}).json()["items"]
    clean = {job["architecture"] for job in jobs if job["status"] == "done" and job["valid"]}
    usable = len(clean) if len(clean) >= 2 else len({job["architecture"] for job in jobs if job["status"] == "done"})
    assert adapted["metrics"]["samples"] == usable >= 2, [job["flags"] for job in jobs]
    prediction = api.post("/predict", json={"device": device, "space": "nb201", "architectures": [NB201_KEY]}).json()
    assert prediction["predictor_id"] == adapted["id"] and prediction["latency_ms"][0] > 0


@pytest.mark.slow
def test_onboarding_whose_jobs_all_fail_is_marked_failed(imported, api: httpx.Client) -> None:
    pretrained(api)
    device = "onboard-no-agent"
    assert api.post("/devices", json={"name": device}).status_code == 201
    started = api.post(f"/devices/{device}/onboard", json={"space": "nb201", "samples": 3}).json()
    jobs = api.get("/jobs", params={"device": device}).json()["items"]
    assert len(jobs) == 3
    for job in jobs:  # no agent serves the device: cancel what it would have measured
        assert api.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    final = wait_until(
        lambda: (o := api.get(f"/onboardings/{started['id']}").json())["status"] in ("ready", "failed") and o, 60
    )
    assert final["status"] == "failed" and "0 usable measurements" in final["error"]
    assert final["jobs_failed"] == 3 and final["predictor_id"] is None


@pytest.mark.slow
def test_agent_measures_a_torch_export_program(settings: Settings, server_url: str, api: httpx.Client,
                                               tmp_path: Path) -> None:
    """A device served with the PyTorch runtime gets `torch.export` artifacts and times them."""
    device = f"e2e-torch-{tmp_path.name[-8:]}"
    with running_agent(server_url, ADMIN_TOKEN, device, 1, tmp_path, ["--poll-wait", "1", "--runtime", "pytorch"]):
        info = wait_until(lambda: registered(api, device), 60)
        assert info["runtime"] == "pytorch"
        job = api.post("/jobs", json={"device": device, "space": "nb201", "architecture": NB201_KEY,
                                      "preset": "quick"}).json()
        done = wait_until(lambda: (j := api.get(f"/jobs/{job['id']}").json())["status"] in ("done", "failed") and j,
                          300)
    assert done["status"] == "done", done
    [measurement] = api.get("/measurements", params={"device": device, "space": "nb201",
                                                     "architecture": NB201_KEY}).json()["items"]
    provenance = measurement["provenance"]
    assert "torch" in str(provenance["runtime"]) and provenance["intra_op_threads"] == 1, provenance
