"""The agent's runtimes (agent/runtimes/): each times a real NB201 model with the real runtime, the
server exports and accepts their artifacts, their devices are onboarded end to end, and a
measurement child does not outlive its agent."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.protocol import ARTIFACT_FORMATS, PRESETS, ArtifactFormat, Preset, Runtime
from agent.runtimes import installed_runtimes, runtime_module
from agent.runtimes.tensorrt import engine_key
from agent.timing import FAILURE_RUNTIME_UNAVAILABLE, measure
from predictor.export import export_onnx, export_tflite, litert_export_problem
from predictor.spaces import get_space
from server.cli.local import free_port, running_agent, server_process
from server.settings import Settings
from tests.helpers import ADMIN_TOKEN, pretrained, registered, wait_until

NB201_KEY = "|nor_conv_1x1~0|+|skip_connect~0|nor_conv_3x3~1|+|skip_connect~0|avg_pool_3x3~1|nor_conv_1x1~2|"
LITERT_EXPORT = litert_export_problem()
needs_litert_export = pytest.mark.skipif(LITERT_EXPORT is not None, reason=str(LITERT_EXPORT))


def needs_runtime(runtime: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(runtime not in installed_runtimes(), reason=f"{runtime} is not installed")


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "nb201.onnx"
    path.write_bytes(export_onnx(get_space("nb201"), NB201_KEY))
    return path


@pytest.fixture(scope="module")
def tflite_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if LITERT_EXPORT is not None:
        pytest.skip(LITERT_EXPORT)
    path = tmp_path_factory.mktemp("models") / "nb201.tflite"
    path.write_bytes(export_tflite(get_space("nb201"), NB201_KEY))
    return path


def test_every_runtime_has_a_module_and_an_artifact_format() -> None:
    for runtime in Runtime:
        module = runtime_module(runtime)
        assert module.INSTALL and callable(module.installed_version) and hasattr(module, "Backend"), runtime
        assert isinstance(ARTIFACT_FORMATS[runtime], ArtifactFormat), runtime


@needs_runtime("openvino")
def test_openvino_times_the_onnx_artifact_with_explicit_threads_and_streams(onnx_model: Path) -> None:
    # the agent's cache names files by sha256, without a suffix: OpenVINO must not need one
    bare = onnx_model.with_name(hashlib.sha256(onnx_model.read_bytes()).hexdigest())
    bare.write_bytes(onnx_model.read_bytes())
    outcome = measure(bare, PRESETS[Preset.quick], 1, runtime=Runtime.openvino)
    assert outcome.ok, outcome.error
    assert outcome.stats is not None and outcome.stats.n >= 15 and outcome.stats.median_ms > 0
    assert outcome.execution["device"] == "CPU" and outcome.execution["performance_hint"] == "LATENCY"
    assert outcome.execution["inference_threads"] == 1 and outcome.execution["streams"] == 1
    assert outcome.execution["inference_precision"] == "f32"
    assert outcome.inputs == {"input": [1, 3, 32, 32]} and outcome.runtime_version


@needs_runtime("litert")
def test_litert_times_a_tflite_model_with_xnnpack(tflite_model: Path) -> None:
    outcome = measure(tflite_model, PRESETS[Preset.quick], 1, runtime=Runtime.litert)
    assert outcome.ok, outcome.error
    assert outcome.stats is not None and outcome.stats.median_ms > 0
    assert outcome.execution == {"num_threads": 1, "delegate": "xnnpack", "op_resolver": "auto"}
    assert outcome.providers == ["XNNPACK"] and list(outcome.inputs.values()) == [[1, 3, 32, 32]]


def test_litert_refuses_an_onnx_file_as_a_load_error(onnx_model: Path) -> None:
    if "litert" not in installed_runtimes():
        pytest.skip("litert is not installed")
    outcome = measure(onnx_model, PRESETS[Preset.quick], 1, runtime=Runtime.litert)
    assert not outcome.ok and outcome.failure_class == "load_error", outcome


@pytest.mark.parametrize("provider", ["CUDAExecutionProvider", "TensorrtExecutionProvider"])
def test_gpu_execution_providers_are_unavailable_without_a_gpu(onnx_model: Path, tmp_path: Path,
                                                               provider: str) -> None:
    """No GPU here: the code path runs up to ONNX Runtime's missing provider (untested on a GPU)."""
    if provider in runtime_module(Runtime.onnxruntime).available_providers():
        pytest.skip(f"{provider} is available here")
    outcome = measure(onnx_model, PRESETS[Preset.quick], 1, provider=provider, engine_cache_dir=tmp_path)
    assert not outcome.ok and outcome.failure_class == FAILURE_RUNTIME_UNAVAILABLE
    assert provider in (outcome.error or "") and "onnxruntime-gpu" in (outcome.error or "")


def test_tensorrt_is_unavailable_without_a_gpu(onnx_model: Path, tmp_path: Path) -> None:
    """No GPU here: the TensorRT runtime fails as unavailable, naming what to install (untested on a GPU)."""
    outcome = measure(onnx_model, PRESETS[Preset.quick], 1, runtime=Runtime.tensorrt, engine_cache_dir=tmp_path)
    if outcome.ok:
        pytest.skip("TensorRT runs here")
    assert outcome.failure_class == FAILURE_RUNTIME_UNAVAILABLE, outcome
    assert "agent-tensorrt" in (outcome.error or "") or "no CUDA GPU" in (outcome.error or ""), outcome.error


def test_tensorrt_engines_are_keyed_by_artifact_gpu_and_version() -> None:
    sha = "ab" * 32
    key = engine_key(sha, "NVIDIA H100 80GB HBM3", "10.3.0")
    assert key == f"{sha}-NVIDIA-H100-80GB-HBM3-trt10.3.0.engine"
    assert len({key, engine_key(sha, "NVIDIA A100", "10.3.0"), engine_key(sha, "NVIDIA H100 80GB HBM3", "10.4.0"),
                engine_key("cd" * 32, "NVIDIA H100 80GB HBM3", "10.3.0")}) == 4


# ------------------------------------------------------------------------------ child lifetime


def _timing_children(parent: int) -> list[int]:
    """Live `agent.timing` processes whose parent is `parent`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _alive(int(entry.name)):
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == parent and b"agent.timing" in cmdline:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_timing_child_dies_with_its_sigkilled_agent(settings: Settings, server_url: str, api: httpx.Client,
                                                    tmp_path: Path) -> None:
    device = f"kill-cpu-{tmp_path.name[-8:]}"
    with running_agent(server_url, ADMIN_TOKEN, device, 1, tmp_path, ["--poll-wait", "1"]) as agent:
        wait_until(lambda: api.get(f"/devices/{device}").status_code == 200, 60)
        # rigorous: at least 3 s of timed runs after the load, so a surviving child outlives the check
        job = api.post("/jobs", json={"device": device, "space": "nb201", "architecture": NB201_KEY,
                                      "preset": "rigorous", "force": True})
        assert job.status_code == 201, job.text
        children = wait_until(lambda: _timing_children(agent.pid), 120, 0.02)
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(10)
        killed = time.monotonic()
        wait_until(lambda: not any(_alive(pid) for pid in children), 2.0, 0.02)
    assert time.monotonic() - killed < 2.0


# --------------------------------------------------------------------------------- server side


def test_uploaded_tflite_is_checked(api: httpx.Client) -> None:
    broken = b"\x1c\x00\x00\x00TFL3" + bytes(64)
    response = api.post("/artifacts", content=broken)
    assert response.status_code == 422 and "not a valid LiteRT model" in response.text, response.text


@needs_litert_export
def test_uploaded_tflite_is_stored_as_tflite(api: httpx.Client, tflite_model: Path) -> None:
    data = tflite_model.read_bytes()
    uploaded = api.post("/artifacts", content=data)
    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.json()["format"] == "tflite" and uploaded.json()["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.fixture
def server_without_litert_torch(tmp_path: Path) -> Iterator[str]:
    """A server process where `import litert_torch` fails, as on a server without the extra."""
    site = tmp_path / "no_litert_torch"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['litert_torch'] = None\n")
    port = free_port()
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p),
           "LATFARM_DATABASE_URL": f"sqlite:///{tmp_path / 'latfarm.db'}", "LATFARM_ADMIN_TOKEN": ADMIN_TOKEN,
           "LATFARM_ARTIFACT_DIR": str(tmp_path / "artifacts")}
    with server_process(env, port, log=tmp_path / "server.log"):
        yield f"http://127.0.0.1:{port}"


def test_litert_job_without_the_export_extra_names_what_to_install(server_without_litert_torch: str) -> None:
    with httpx.Client(base_url=f"{server_without_litert_torch}/api/v1", timeout=60,
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as api:
        device = api.post("/devices", json={"name": "pi5-litert-4t", "runtime": "litert", "threads": 4})
        assert device.status_code == 201, device.text
        job = api.post("/jobs", json={"device": "pi5-litert-4t", "space": "nb201", "architecture": NB201_KEY})
    assert job.status_code == 422, job.text
    assert "litert-torch" in job.text and "latfarm[server-litert]" in job.text


# ------------------------------------------------------------------------------------ end to end


RUNTIME_DEVICES = [
    pytest.param("openvino", marks=needs_runtime("openvino")),
    pytest.param("litert", marks=[needs_runtime("litert"), needs_litert_export]),
]


@pytest.mark.parametrize("runtime", RUNTIME_DEVICES)
def test_runtime_device_measures_the_servers_artifact(runtime: str, settings: Settings, server_url: str,
                                                      api: httpx.Client, tmp_path: Path) -> None:
    """A real agent process times the artifact the server exported in its runtime's format with the
    real runtime, reached by a selector on the runtime."""
    device = f"cpu-{runtime}-1t-{tmp_path.name[-8:]}"
    fmt = ARTIFACT_FORMATS[Runtime(runtime)].value
    with running_agent(server_url, ADMIN_TOKEN, device, 1, tmp_path, ["--poll-wait", "1", "--runtime", runtime]):
        info = wait_until(lambda: registered(api, device), 60)
        assert info["runtime"] == runtime
        job = api.post("/jobs", json={"selector": f"runtime == {runtime} and name == {device}", "space": "nb201",
                                      "architecture": NB201_KEY, "preset": "quick", "force": True})
        assert job.status_code == 201, job.text
        done = wait_until(lambda: (j := api.get(f"/jobs/{job.json()['id']}").json())["status"] in ("done", "failed")
                          and j, 600)
    assert done["status"] == "done" and done["device"] == device, done
    [measurement] = [m for m in api.get("/measurements", params={"device": device}).json()["items"]
                     if m["job_id"] == done["id"]]
    provenance = measurement["provenance"]
    assert provenance["runtime"] == runtime and provenance["artifact_format"] == fmt, provenance
    if runtime == "litert":
        assert provenance["delegate"] == "xnnpack" and provenance["num_threads"] == 1
    else:
        assert provenance["performance_hint"] == "LATENCY" and provenance["inference_threads"] == 1
        assert provenance["streams"] == 1
    artifact = api.get(f"/artifacts/{done['artifact_sha256']}").content
    assert hashlib.sha256(artifact).hexdigest() == done["artifact_sha256"]
    assert (artifact[4:8] == b"TFL3") == (fmt == "tflite")


@pytest.mark.slow
@pytest.mark.timeout(2400)  # pre-training the base predictor on a loaded 2-core machine took over 15 min
@pytest.mark.parametrize("runtime", RUNTIME_DEVICES)
def test_runtime_device_is_onboarded_end_to_end(runtime: str, imported: Settings, server_url: str,
                                                api: httpx.Client, tmp_path: Path) -> None:
    """Onboarding a device of the runtime adapts a predictor from its real measurements; /predict serves it."""
    pretrained(api)
    device = f"onboard-{runtime}-1t-{tmp_path.name[-8:]}"
    with running_agent(server_url, ADMIN_TOKEN, device, 1, tmp_path, ["--poll-wait", "1", "--runtime", runtime]):
        wait_until(lambda: registered(api, device), 60)
        started = api.post(f"/devices/{device}/onboard", json={"space": "nb201", "samples": 4, "preset": "quick"})
        assert started.status_code == 202, started.text
        final = wait_until(lambda: (o := api.get(f"/onboardings/{started.json()['id']}").json())["status"]
                           in ("ready", "failed") and o, 900, 1.0)
    assert final["status"] == "ready", final
    prediction = api.post("/predict", json={"device": device, "space": "nb201", "architectures": [NB201_KEY]})
    assert prediction.status_code == 200, prediction.text
    assert prediction.json()["predictor_id"] == final["predictor_id"] and prediction.json()["latency_ms"][0] > 0
