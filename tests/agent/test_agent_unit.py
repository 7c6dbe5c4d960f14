"""Agent unit tests on real parts: real ONNX models timed by ONNX Runtime, a real torch.export
program timed by PyTorch, real child processes, real HTTP servers."""

from __future__ import annotations

import functools
import hashlib
import http.server
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import __version__
from agent.cache import ArtifactCache, ArtifactDownloadError, ArtifactError, ArtifactIntegrityError
from agent.capabilities import default_device_name, detect_capabilities, device_attributes
from agent.cli import build_parser, settings_from_args
from agent.cli import main as cli_main
from agent.client import ServerClient
from agent.protocol import (
    PRESETS,
    PROTOCOL_VERSION,
    ArtifactFormat,
    ArtifactRef,
    JobResult,
    Preset,
    Runtime,
    TimingProtocol,
)
from agent.quality import quality_flags, trusted
from agent.settings import ENV_VARS, MB, AgentSettings
from agent.timing import classify_failure, compute_stats, measure, warm_up
from agent.worker import Worker
from tests.helpers import (
    FAST,
    REPO,
    FakeFarm,
    LocalServer,
    UpperBoundRng,
    agent_settings,
    fast_client,
    save_onnx_model,
    start_agent_cli,
    wait_for,
)


def python_output(code: str) -> str:
    """What `code` prints, run in a fresh interpreter (imports there start from nothing)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          check=True)
    return done.stdout.strip()
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed (the pytorch runtime is optional)")


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def torch_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny module exported with torch.export and saved with torch.export.save."""
    torch: Any = pytest.importorskip("torch", reason="torch is not installed (the pytorch runtime is optional)")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x: Any, *, scale: Any) -> Any:
            return torch.relu(self.conv(x)) * scale

    torch.manual_seed(0)
    program = torch.export.export(Tiny().eval(), (torch.zeros(1, 3, 16, 16),), {"scale": torch.tensor(2.0)})
    path = tmp_path_factory.mktemp("torch") / "tiny.pt2"
    torch.export.save(program, str(path))
    return path


@pytest.fixture
def torch_blocked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import torch` fail in child processes started from here (as where it is not
    installed), through a sitecustomize on their PYTHONPATH."""
    site = tmp_path / "no_torch"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p))


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[LocalServer, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    server = LocalServer(functools.partial(_QuietFiles, directory=str(root)))
    yield server, root
    server.close()


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --------------------------------------------------------------------------------------- timing


def test_compute_stats() -> None:
    stats = compute_stats([1.0, 2.0, 3.0, 4.0, 5.0])
    assert stats.n == 5 and stats.median_ms == 3.0 and stats.mean_ms == 3.0
    assert stats.min_ms == 1.0 and stats.max_ms == 5.0 and stats.iqr_ms == 2.0
    assert stats.p99_ms is None
    assert stats.cv == pytest.approx(np.std([1, 2, 3, 4, 5], ddof=1) / 3.0)
    big = compute_stats(list(np.linspace(1.0, 2.0, 100)))
    assert big.p99_ms is not None and 1.9 < big.p99_ms <= 2.0
    with pytest.raises(ValueError):
        compute_stats([])


def _scripted(durations: list[int]) -> tuple[Callable[[], int], list[int]]:
    """A run_ns that returns `durations` in turn; the second value lists the ones returned."""
    given: list[int] = []

    def run_ns() -> int:
        given.append(durations[len(given)])
        return given[-1]

    return run_ns, given


def test_warm_up_stops_once_window_medians_agree() -> None:
    proto = TimingProtocol(warmup_runs=0, warmup_window=5, warmup_tolerance=0.03, warmup_max_runs=200)
    # Window medians 100, 50, 49: the third is within 3 % of the second.
    run_ns, given = _scripted([100] * 5 + [50] * 5 + [49] * 5 + [1] * 100)
    assert warm_up(run_ns, proto) == 15 and len(given) == 15
    # The median, not the mean: one outlier per window does not keep the warm-up going.
    run_ns, _ = _scripted([100, 100, 100, 100, 900] + [101, 100, 5000, 99, 100] + [1] * 100)
    assert warm_up(run_ns, proto) == 10


def test_warm_up_minimum_and_cap() -> None:
    stable = [10] * 1000
    # Stable from the start, but at least warmup_runs runs: windows end at 5, 10, 15.
    run_ns, _ = _scripted(stable)
    assert warm_up(run_ns, TimingProtocol(warmup_runs=12, warmup_window=5, warmup_max_runs=200)) == 15
    # Never stable: stops at warmup_max_runs, the last window cut short.
    run_ns, _ = _scripted([10, 20] * 500)
    unstable = TimingProtocol(warmup_runs=0, warmup_window=1, warmup_tolerance=0.05, warmup_max_runs=23)
    assert warm_up(run_ns, unstable) == 23
    run_ns, _ = _scripted([10] * 5 + [20] * 5 + [10] * 5 + [20] * 5 + [10] * 5)
    assert warm_up(run_ns, TimingProtocol(warmup_runs=0, warmup_window=5, warmup_max_runs=23)) == 23
    # A cap below the minimum does not cut the minimum.
    run_ns, _ = _scripted([10, 20] * 500)
    assert warm_up(run_ns, TimingProtocol(warmup_runs=40, warmup_window=1, warmup_max_runs=10)) == 40
    # No warm-up at all.
    run_ns, given = _scripted([])
    assert warm_up(run_ns, TimingProtocol(warmup_runs=0, warmup_max_runs=0)) == 0 and given == []


def test_a_fast_model_is_flagged_short_and_still_trusted_where_noise_is_not() -> None:
    quick = PRESETS[Preset.quick]
    fast = [0.018] * quick.max_runs  # the run cap came first: 0.09 s of 0.2 s timed
    assert quality_flags(fast, quick) == ["short"] and trusted(fast, quick, ["short"])
    too_few = [5.0] * (quick.min_runs - 1)
    assert "short" in quality_flags(too_few, quick) and not trusted(too_few, quick, quality_flags(too_few, quick))
    noisy = [1.0, 1.2, 1.4] * 200
    assert quality_flags(noisy, quick) == ["unstable"] and not trusted(noisy, quick, ["unstable"])
    drifting = np.linspace(1.0, 1.09, 400).tolist()  # the median crept up 6 %, the spread stayed small
    assert quality_flags(drifting, quick) == ["drift"] and not trusted(drifting, quick, ["drift"])


def test_classify_failure() -> None:
    ort_missing_kernel = RuntimeError(
        "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for Relu(14) node"
    )
    assert classify_failure(ort_missing_kernel, "load_error") == "unsupported_op"
    assert classify_failure(NotImplementedError("Could not run 'aten::foo'"), "runtime_error") == "unsupported_op"
    assert classify_failure(MemoryError(), "runtime_error") == "out_of_memory"
    assert classify_failure(RuntimeError("std::bad_alloc"), "load_error") == "out_of_memory"
    assert classify_failure(RuntimeError("DefaultCPUAllocator: can't allocate memory"), "x") == "out_of_memory"
    assert classify_failure(TypeError("unsupported operand type(s) for +"), "runtime_error") == "runtime_error"
    assert classify_failure(ValueError("bad graph"), "load_error") == "load_error"


def test_measure_in_child_process(model_path: Path) -> None:
    outcome = measure(model_path, FAST, threads=1)
    assert outcome.ok, outcome.error
    stats = outcome.stats
    assert stats is not None
    assert FAST.min_runs <= stats.n <= FAST.max_runs
    assert len(outcome.samples_ms) == stats.n
    assert stats.median_ms > 0 and stats.min_ms <= stats.median_ms <= stats.max_ms
    assert stats.p99_ms is None  # n < 100
    assert outcome.load_ms is not None and outcome.load_ms > 0
    assert outcome.first_inference_ms is not None and outcome.first_inference_ms > 0
    # Warm-up: whole windows, at least two (one to compare with), within the cap.
    assert outcome.warmup_runs is not None
    assert max(FAST.warmup_runs, 2 * FAST.warmup_window) <= outcome.warmup_runs <= FAST.warmup_max_runs
    assert outcome.warmup_runs % FAST.warmup_window == 0
    assert outcome.providers == ["CPUExecutionProvider"]
    assert outcome.execution == {"intra_op_threads": 1, "inter_op_threads": 1, "execution_mode": "sequential",
                                 "graph_optimization": "all"}
    assert outcome.inputs == {"x": [1, 3, 32, 32]}
    if hasattr(os, "sched_getaffinity"):
        assert outcome.affinity is not None and len(outcome.affinity) == 1
        assert set(outcome.affinity) <= os.sched_getaffinity(0)
    assert outcome.pid is not None and outcome.pid != os.getpid() and _pid_gone(outcome.pid)


def test_measure_warm_up_cap_and_minimum(model_path: Path) -> None:
    capped = FAST.model_copy(update={"warmup_runs": 0, "warmup_window": 7, "warmup_tolerance": 1e-12,
                                     "warmup_max_runs": 31})
    # The child warms up in the protocol's windows up to its cap: a whole number of windows of 7
    # (two at least, to compare), or the cap, 31, whose last window is cut short. Usually the cap:
    # only two windows' medians equal to the nanosecond meet this tolerance, and a real model's
    # can be (`test_warm_up_minimum_and_cap` checks the rule on scripted durations). Windows of
    # FAST's 5 could give none of these counts.
    outcome = measure(model_path, capped, threads=1, cpus=None)
    assert outcome.ok, outcome.error
    assert outcome.warmup_runs in (14, 21, 28, 31)
    none = FAST.model_copy(update={"warmup_runs": 0, "warmup_max_runs": 0})
    assert measure(model_path, none, threads=1, cpus=None).warmup_runs == 0


def test_measure_execution_provider(model_path: Path) -> None:
    import onnxruntime

    explicit = measure(model_path, FAST, threads=1, provider="CPUExecutionProvider")
    assert explicit.ok and explicit.providers == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this host has CUDA: cannot check an unavailable provider with it")
    missing = measure(model_path, FAST, threads=1, provider="CUDAExecutionProvider")
    assert not missing.ok and missing.failure_class == "runtime_unavailable"
    assert "CUDAExecutionProvider is not available" in (missing.error or "")
    assert missing.runtime_version == onnxruntime.__version__ and missing.load_ms is None


def test_measure_timeout_kills_child(model_path: Path) -> None:
    slow = FAST.model_copy(update={"min_seconds": 120.0, "max_runs": 1_000_000, "timeout_s": 1.5})
    outcome = measure(model_path, slow, threads=1)
    assert not outcome.ok
    assert outcome.failure_class == "run_timeout"
    assert outcome.error is not None and "run timeout" in outcome.error and "1.5 s" in outcome.error
    assert outcome.stats is None
    assert 1.5 <= outcome.wall_s < 15
    assert outcome.pid is not None and _pid_gone(outcome.pid)


def test_measure_cancel_kills_child(model_path: Path) -> None:
    slow = FAST.model_copy(update={"min_seconds": 120.0, "max_runs": 1_000_000, "timeout_s": 60})
    cancel = threading.Event()
    timer = threading.Timer(1.0, cancel.set)
    timer.start()
    try:
        outcome = measure(model_path, slow, threads=1, cancel=cancel)
    finally:
        timer.cancel()
    assert outcome.failure_class == "cancelled"
    assert outcome.wall_s < 15 and outcome.pid is not None and _pid_gone(outcome.pid)


def test_measure_corrupt_model_is_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not an onnx model")
    outcome = measure(bad, FAST, threads=1)
    assert not outcome.ok and outcome.failure_class == "load_error"
    assert outcome.error and outcome.stats is None
    missing = measure(tmp_path / "missing.onnx", FAST, threads=1)
    assert missing.failure_class == "load_error"


def test_measure_op_without_kernel_is_unsupported_op(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    # Relu accepts int16 since opset 14 (the model is valid), but ONNX Runtime has no int16 kernel.
    path = save_onnx_model(
        tmp_path / "relu_int16.onnx",
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.INT16, [4])],
        [helper.make_tensor_value_info("y", TensorProto.INT16, [4])],
        opset=14,
    )
    outcome = measure(path, FAST, threads=1)
    assert not outcome.ok and outcome.failure_class == "unsupported_op", outcome.error
    assert "Relu" in (outcome.error or "")


def test_measure_allocation_failure_is_out_of_memory(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    # 2**55 floats (128 PiB): more than any address space, so the allocation fails at once.
    shape = numpy_helper.from_array(np.array([1 << 55], dtype=np.int64), "shape")
    path = save_onnx_model(
        tmp_path / "huge.onnx",
        [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                          value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
         helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("big", TensorProto.FLOAT, [None]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializers=[shape],
    )
    outcome = measure(path, FAST, threads=1)
    assert not outcome.ok and outcome.failure_class == "out_of_memory", outcome.error


@needs_torch
def test_measure_pytorch_program(torch_program: Path) -> None:
    outcome = measure(torch_program, FAST, threads=1, runtime=Runtime.pytorch)
    assert outcome.ok, outcome.error
    assert outcome.stats is not None and FAST.min_runs <= outcome.stats.n <= FAST.max_runs
    assert outcome.load_ms is not None and outcome.load_ms > 0
    assert outcome.first_inference_ms is not None and outcome.first_inference_ms > 0
    assert outcome.warmup_runs is not None and outcome.warmup_runs >= max(FAST.warmup_runs, 2 * FAST.warmup_window)
    assert outcome.execution == {"intra_op_threads": 1, "inter_op_threads": 1, "inference_mode": True}
    assert outcome.runtime_version == detect_capabilities().runtimes["pytorch"]
    assert outcome.providers == []
    assert outcome.inputs == {"x": [1, 3, 16, 16], "scale": []}
    assert outcome.pid is not None and _pid_gone(outcome.pid)


def test_measure_pytorch_without_torch_is_runtime_unavailable(model_path: Path, torch_blocked: None) -> None:
    outcome = measure(model_path, FAST, threads=1, runtime=Runtime.pytorch)
    assert not outcome.ok and outcome.failure_class == "runtime_unavailable"
    assert "torch" in (outcome.error or "") and outcome.load_ms is None


# ---------------------------------------------------------------------------------------- cache


def test_cache_downloads_verifies_and_hits(file_server: tuple[LocalServer, Path], tmp_path: Path) -> None:
    import httpx

    server, root = file_server
    payload = os.urandom(300_000)
    sha = hashlib.sha256(payload).hexdigest()
    (root / "model.onnx").write_bytes(payload)
    cache = ArtifactCache(tmp_path / "cache")
    assert cache.get(sha) is None

    with httpx.Client(base_url=server.url) as client:
        path = cache.download(client, "/model.onnx", sha, expected_size=len(payload))
        assert path == cache.path_for(sha) and path.read_bytes() == payload

        wrong = hashlib.sha256(b"something else").hexdigest()
        with pytest.raises(ArtifactIntegrityError):
            cache.download(client, "/model.onnx", wrong)
        assert cache.get(wrong) is None

        with pytest.raises(ArtifactDownloadError) as err:
            cache.download(client, "/nope.onnx", wrong)
        assert err.value.status_code == 404

    with pytest.raises(ArtifactError):
        cache.path_for("../../etc/passwd")
    # Nothing but the verified file is left behind (no partial downloads).
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [sha]

    server.close()  # a hit must not need the network
    assert cache.get(sha) == path
    with httpx.Client(base_url=server.url) as client:
        assert cache.download(client, "/model.onnx", sha) == path


def _publish(root: Path, name: str, size: int) -> tuple[str, bytes]:
    payload = os.urandom(size)
    (root / name).write_bytes(payload)
    return hashlib.sha256(payload).hexdigest(), payload


def test_cache_evicts_least_recently_used(file_server: tuple[LocalServer, Path], tmp_path: Path) -> None:
    import httpx

    server, root = file_server
    a, b, c, d = (_publish(root, name, 100_000)[0] for name in "abcd")
    cache = ArtifactCache(tmp_path / "cache", max_bytes=350_000)
    with httpx.Client(base_url=server.url) as client:
        for sha, name in ((a, "a"), (b, "b"), (c, "c")):
            cache.download(client, f"/{name}", sha)
        # Downloaded in the order a, b, c; then a is used again, so b is the least recently used.
        for age, sha in enumerate((a, b, c)):
            os.utime(cache.path_for(sha), (1_000_000 + age, 1_000_000 + age))
        assert cache.get(a) == cache.path_for(a)
        cache.download(client, "/d", d)  # 400 kB > 350 kB: b goes
        assert sorted(p.name for p in cache.root.iterdir()) == sorted([a, c, d])

        # A file larger than the cap on its own is kept (it is about to be used); the rest goes.
        big, _ = _publish(root, "big", 500_000)
        cache.download(client, "/big", big)
        assert [p.name for p in cache.root.iterdir()] == [big]


def test_cache_replaces_a_corrupted_file(farm: Callable[[], tuple[FakeFarm, LocalServer]], tmp_path: Path) -> None:
    fake, server = farm()
    sha, payload = next(iter(fake.artifacts.items()))
    ref = ArtifactRef(sha256=sha, format=ArtifactFormat.onnx, size_bytes=len(payload), url=f"/api/v1/artifacts/{sha}")
    cache = ArtifactCache(tmp_path / "cache")
    client = ServerClient(server.url, "unused", max_attempts=1)
    path = client.fetch_artifact(ref, cache)
    assert path.read_bytes() == payload and fake.downloads == 1
    assert client.fetch_artifact(ref, cache) == path and fake.downloads == 1  # a verified hit

    path.write_bytes(b"bit rot" + payload[7:])
    assert cache.get(sha) is None and not path.exists()  # found out, and deleted
    path.write_bytes(b"bit rot" + payload[7:])
    assert client.fetch_artifact(ref, cache) == path and fake.downloads == 2  # downloaded again
    assert path.read_bytes() == payload
    client.close()


# --------------------------------------------------------------------------- capabilities, CLI


def test_capabilities() -> None:
    import onnxruntime

    caps = detect_capabilities()
    assert caps.cpu_cores > 0 and caps.memory_bytes > 0
    assert caps.cpu_model and caps.hostname and caps.os
    assert caps.runtimes["onnxruntime"] == onnxruntime.__version__
    assert "CPUExecutionProvider" in caps.onnxruntime_providers
    assert caps.agent_version == __version__ and caps.protocol_version == PROTOCOL_VERSION
    attrs = device_attributes(caps, 4)
    assert attrs["threads"] == 4 and attrs["batch_size"] == 1 and attrs["runtime"] == "onnxruntime"
    assert attrs["precision"] == "fp32" and attrs["provider"] == "CPUExecutionProvider"
    assert attrs["runtime_version"] == onnxruntime.__version__
    assert device_attributes(caps, 1, provider="CUDAExecutionProvider")["provider"] == "CUDAExecutionProvider"
    assert default_device_name(4, "bench01.lab.example") == "bench01-ort-4t-b1"
    assert default_device_name(1, "odd host_name!") == "odd-host_name-ort-1t-b1"
    assert default_device_name(1, "bench01", Runtime.pytorch) == "bench01-torch-1t-b1"
    assert default_device_name(2, "bench01", provider="CUDAExecutionProvider") == "bench01-ort-cuda-2t-b1"
    assert default_device_name(2, "bench01", provider="CPUExecutionProvider") == "bench01-ort-2t-b1"


@needs_torch
def test_capabilities_list_pytorch_without_importing_it() -> None:
    code = (
        "import sys, json\n"
        "from agent.capabilities import detect_capabilities, device_attributes\n"
        "from agent.protocol import Runtime\n"
        "caps = detect_capabilities()\n"
        "attrs = device_attributes(caps, 1, Runtime.pytorch)\n"
        "print(json.dumps([caps.runtimes, attrs, 'torch' in sys.modules]))\n"
    )
    output = python_output(code)
    runtimes, attrs, imported = json.loads(output)
    import torch

    assert runtimes["pytorch"] == torch.__version__ and not imported
    assert attrs["runtime"] == "pytorch" and attrs["runtime_version"] == torch.__version__
    assert attrs["provider"] is None


def test_capabilities_without_torch(torch_blocked: None) -> None:
    code = "from agent.capabilities import detect_capabilities\nprint(sorted(detect_capabilities().runtimes))\n"
    runtimes = python_output(code)
    assert "'onnxruntime'" in runtimes and "pytorch" not in runtimes


def _clear_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)


def test_settings_env_and_flag_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clear_env(monkeypatch)
    monkeypatch.setenv(ENV_VARS["server"], "http://env:8000/")
    monkeypatch.setenv(ENV_VARS["token"], "env-token")
    monkeypatch.setenv(ENV_VARS["devices"], "a-ort-2t-b1, b-ort-2t-b1")
    monkeypatch.setenv(ENV_VARS["threads"], "2")
    monkeypatch.setenv(ENV_VARS["cache_dir"], str(tmp_path))
    monkeypatch.setenv(ENV_VARS["state_dir"], str(tmp_path / "state"))
    monkeypatch.setenv(ENV_VARS["cache_max_bytes"], "1.5")
    monkeypatch.setenv(ENV_VARS["provider"], "CPUExecutionProvider")
    settings = AgentSettings.load()
    assert settings.server == "http://env:8000" and settings.token == "env-token"
    assert settings.devices == ["a-ort-2t-b1", "b-ort-2t-b1"] and settings.threads == 2
    assert settings.cache_dir == tmp_path and settings.name
    assert settings.state_dir == tmp_path / "state" and settings.cache_max_bytes == int(1.5 * MB)
    assert settings.runtime is Runtime.onnxruntime and settings.provider == "CPUExecutionProvider"
    settings = AgentSettings.load({"server": "https://flag", "threads": 3, "devices": None})
    assert settings.server == "https://flag" and settings.threads == 3 and settings.token == "env-token"
    assert settings.devices == ["a-ort-2t-b1", "b-ort-2t-b1"]
    for var in ("cache_dir", "state_dir", "cache_max_bytes", "provider"):
        monkeypatch.delenv(ENV_VARS[var])
    defaults = AgentSettings.load()
    assert defaults.cache_dir == Path("~/.cache/latfarm/artifacts").expanduser()
    assert defaults.state_dir == Path("~/.local/state/latfarm-agent").expanduser()
    assert defaults.cache_max_bytes == 2048 * MB and defaults.provider is None
    monkeypatch.setenv(ENV_VARS["runtime"], "pytorch")
    assert AgentSettings.load().runtime is Runtime.pytorch


def test_cli_flags_set_runtime_provider_state_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_env(monkeypatch)
    base = ["--server", "http://x", "--token", "t"]
    args = build_parser().parse_args(
        [*base, "--runtime", "pytorch", "--state-dir", str(tmp_path / "s"), "--cache-max-mb", "64"]
    )
    settings = settings_from_args(args)
    assert settings.runtime is Runtime.pytorch and settings.provider is None
    assert settings.state_dir == tmp_path / "s" and settings.cache_max_bytes == 64 * MB
    caps = detect_capabilities()
    worker = Worker(settings, capabilities=caps)
    (device,) = worker.devices
    assert device.name == default_device_name(1, caps.hostname, Runtime.pytorch) and "-torch-1t-b1" in device.name
    assert device.attributes["runtime"] == "pytorch" and device.attributes["provider"] is None
    worker.client.close()

    settings = settings_from_args(
        build_parser().parse_args([*base, "--provider", "CPUExecutionProvider", "--state-dir", str(tmp_path / "s")])
    )
    worker = Worker(settings, capabilities=caps)
    (device,) = worker.devices
    assert device.attributes["runtime"] == "onnxruntime" and device.attributes["provider"] == "CPUExecutionProvider"
    worker.client.close()


def test_cli_rejects_bad_runtime_settings(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _clear_env(monkeypatch)
    base = ["--server", "http://x", "--token", "t"]
    with pytest.raises(SystemExit) as exc:
        cli_main([*base, "--runtime", "pytorch", "--provider", "CUDAExecutionProvider"])
    assert exc.value.code == 2 and "--provider" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main([*base, "--runtime", "tensorflow"])
    assert exc.value.code == 2
    monkeypatch.setenv(ENV_VARS["cache_max_bytes"], "lots")
    with pytest.raises(SystemExit) as exc:
        cli_main(base)
    assert exc.value.code == 2 and ENV_VARS["cache_max_bytes"] in capsys.readouterr().err


def test_cli_without_server_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _clear_env(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        cli_main(["--token", "t"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--server" in err and ENV_VARS["server"] in err
    with pytest.raises(SystemExit) as exc:
        cli_main(["--server", "http://x", "--threads", "0"])
    assert exc.value.code == 2


def test_agent_imports_stay_light() -> None:
    # Not `rich`: httpx itself imports it (for its own CLI) whenever it is installed.
    code = (
        "import sys, agent.cli, agent.worker, agent.timing, agent.client, agent.cache, agent.capabilities, "
        "agent.state, agent.backoff\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'server', 'predictor', 'torch', 'fastapi', 'sqlalchemy', 'typer', 'pydantic_settings', 'onnx'})\n"
        "print(','.join(bad))\n"
    )
    output = python_output(code)
    assert output == "", f"agent imports pulled in: {output}"


# ----------------------------------------------------------------- worker against a fake server


def test_worker_runs_jobs_end_to_end(farm: Callable[[], tuple[FakeFarm, LocalServer]], tmp_path: Path) -> None:
    fake, server = farm()
    sha = next(iter(fake.artifacts))
    device = "testhost-ort-1t-b1"
    slow = FAST.model_copy(update={"min_seconds": 120.0, "max_runs": 1_000_000})
    fake.add_job(1, sha, FAST, device)  # measured
    fake.add_job(2, sha, slow, device)  # cancelled by the server while running
    fake.add_job(3, "0" * 64, FAST, device)  # artifact missing on the server
    fake.add_job(4, sha, FAST, device)  # lease goes stale: result refused with 409
    fake.add_job(5, sha, FAST, device)
    fake.jobs[-1]["protocol"]["max_runs"] = 10**9  # a lease this agent cannot parse
    fake.add_job(6, sha, FAST, device, runtime=Runtime.pytorch, artifact_format="onnx")  # runtime/format mismatch
    fake.cancel.add(2)
    fake.stale.add(4)
    fake.fail_next_polls = 1  # a 503 is retried

    settings = agent_settings(server.url, tmp_path)
    worker = Worker(settings, client=fast_client(settings))
    assert worker.run(install_signal_handlers=False) == 0
    assert worker.jobs_done == 6

    (reg,) = fake.registrations
    assert reg["name"] == "test-agent" and reg["devices"][0]["name"] == device
    assert reg["devices"][0]["attributes"]["threads"] == 1
    assert reg["devices"][0]["attributes"]["runtime"] == "onnxruntime"
    assert reg["devices"][0]["attributes"]["provider"] == "CPUExecutionProvider"

    ok = JobResult.model_validate(fake.results[1])
    assert ok.status.value == "ok" and ok.lease_id == "lease-1" and ok.protocol_version == PROTOCOL_VERSION
    assert ok.stats is not None and ok.stats.n == len(ok.samples_ms) >= FAST.min_runs
    assert ok.warmup_runs is not None and ok.warmup_runs >= max(FAST.warmup_runs, 2 * FAST.warmup_window)
    prov = ok.provenance
    assert prov["artifact_sha256"] == sha and prov["runtime"] == "onnxruntime" and prov["threads"] == 1
    assert prov["agent_version"] == __version__ and prov["protocol_version"] == PROTOCOL_VERSION
    assert prov["preset"] == "quick" and prov["providers"] == ["CPUExecutionProvider"]
    assert prov["inter_op_threads"] == 1 and prov["execution_mode"] == "sequential"
    assert prov["warmup_window"] == FAST.warmup_window and prov["warmup_max_runs"] == FAST.warmup_max_runs
    for key in ("runtime_version", "cpu_model", "os", "hostname", "affinity"):
        assert key in prov

    cancelled = JobResult.model_validate(fake.results[2])
    assert cancelled.status.value == "failed" and cancelled.failure_class == "cancelled"
    assert fake.heartbeats.get(2, 0) >= 1

    missing = JobResult.model_validate(fake.results[3])
    assert missing.status.value == "failed" and missing.failure_class == "artifact_error"

    assert 4 not in fake.results

    bad = JobResult.model_validate(fake.results[5])
    assert bad.status.value == "failed" and bad.failure_class == "bad_lease" and "max_runs" in (bad.error or "")

    mismatch = JobResult.model_validate(fake.results[6])
    assert mismatch.failure_class == "bad_lease"
    assert mismatch.error == "runtime pytorch cannot run artifact format onnx"

    assert (tmp_path / "cache" / sha).is_file()
    # Every result was acknowledged (or refused for good): nothing is left in the outbox.
    assert list((tmp_path / "state" / "outbox").iterdir()) == []


def test_worker_runs_the_lease_handed_back_with_its_result(
    farm: Callable[[], tuple[FakeFarm, LocalServer]], tmp_path: Path
) -> None:
    fake, server = farm()
    sha = next(iter(fake.artifacts))
    for job_id in (1, 2, 3):
        fake.add_job(job_id, sha, FAST, "testhost-ort-1t-b1")
    fake.jobs[2]["protocol"]["max_runs"] = 10**9  # handed back with job 2's result, unparseable

    settings = agent_settings(server.url, tmp_path)
    worker = Worker(settings, client=fast_client(settings))
    assert worker.run(install_signal_handlers=False) == 0

    # one poll for job 1, then each result brought the next lease; the last poll found the queue empty
    assert fake.requests.count("GET /api/v1/agents/me/jobs/next") == 2
    assert [JobResult.model_validate(fake.results[j]).status.value for j in (1, 2)] == ["ok", "ok"]
    bad = JobResult.model_validate(fake.results[3])
    assert bad.failure_class == "bad_lease" and bad.lease_id == "lease-3" and "max_runs" in (bad.error or "")


@needs_torch
def test_worker_times_a_pytorch_job_end_to_end(
    farm: Callable[[], tuple[FakeFarm, LocalServer]], torch_program: Path, tmp_path: Path
) -> None:
    fake, server = farm()
    data = torch_program.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    fake.artifacts[sha] = data
    device = "testhost-torch-1t-b1"
    fake.add_job(1, sha, FAST, device, runtime=Runtime.pytorch)

    settings = agent_settings(server.url, tmp_path, runtime=Runtime.pytorch, devices=[])
    worker = Worker(settings, client=fast_client(settings))
    assert worker.devices[0].name.endswith("-torch-1t-b1")
    assert worker.run(install_signal_handlers=False) == 0

    (reg,) = fake.registrations
    attributes = reg["devices"][0]["attributes"]
    assert attributes["runtime"] == "pytorch" and attributes["provider"] is None
    result = JobResult.model_validate(fake.results[1])
    assert result.status.value == "ok", result.error
    assert result.stats is not None and result.stats.n >= FAST.min_runs and result.warmup_runs
    prov = result.provenance
    assert prov["runtime"] == "pytorch" and prov["runtime_version"] == attributes["runtime_version"]
    assert prov["artifact_format"] == "torch_export" and prov["providers"] == []
    assert prov["intra_op_threads"] == 1 and prov["inter_op_threads"] == 1 and prov["inference_mode"] is True
    assert prov["inputs"] == ["x:1x3x16x16", "scale:"]


def test_worker_without_its_runtime_exits_1(farm: Callable[[], tuple[FakeFarm, LocalServer]], tmp_path: Path) -> None:
    fake, server = farm()
    caps = detect_capabilities().model_copy(update={"runtimes": {"onnxruntime": "1.0"}})
    settings = agent_settings(server.url, tmp_path, runtime=Runtime.pytorch, devices=[])
    assert Worker(settings, capabilities=caps).run(install_signal_handlers=False) == 1
    settings = agent_settings(server.url, tmp_path, provider="NoSuchExecutionProvider")
    assert Worker(settings, capabilities=caps).run(install_signal_handlers=False) == 1
    assert fake.registrations == []  # refused before registering a device it cannot serve


def test_worker_refused_registration_exits_1(farm: Callable[[], tuple[FakeFarm, LocalServer]], tmp_path: Path) -> None:
    _, server = farm()
    settings = agent_settings(server.url, tmp_path, token="wrong")
    assert Worker(settings).run(install_signal_handlers=False) == 1
    assert not (tmp_path / "state" / "credentials.json").exists()


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
def test_cli_sigterm_during_long_poll_exits_cleanly(
    farm: Callable[[], tuple[FakeFarm, LocalServer]], tmp_path: Path
) -> None:
    fake, server = farm()
    proc = start_agent_cli(server, tmp_path, "--poll-wait", "8")
    try:
        wait_for(lambda: bool(fake.registrations))
        time.sleep(0.5)  # now blocked in the long poll
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert time.monotonic() - started < 5, "a long poll must not delay shutdown"
    assert "registered as agent 7" in out


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_cli_first_ctrl_c_finishes_the_running_job(
    farm: Callable[[], tuple[FakeFarm, LocalServer]], tmp_path: Path
) -> None:
    fake, server = farm()
    sha = next(iter(fake.artifacts))
    fake.add_job(11, sha, FAST.model_copy(update={"min_seconds": 2.0, "max_runs": 1_000_000}), "testhost-ort-1t-b1")
    proc = start_agent_cli(server, tmp_path, "--poll-wait", "0.2")
    try:
        wait_for(lambda: fake.heartbeats.get(11, 0) >= 1)  # the job is being measured
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    result = JobResult.model_validate(fake.results[11])
    assert result.status.value == "ok" and result.stats is not None
    assert "job 11 device=testhost-ort-1t-b1" in out and "median=" in out and "flags=" in out


def test_client_retries_then_gives_up_and_maps_errors(farm: Callable[[], tuple[FakeFarm, LocalServer]]) -> None:
    from agent.client import AuthError, LeaseLostError, ServerUnavailable
    from agent.protocol import ResultStatus

    fake, server = farm()
    sleeps: list[float] = []
    client = ServerClient(server.url, "wrong-token", max_attempts=3, backoff_s=0.01, sleep=sleeps.append,
                          rng=UpperBoundRng())
    with pytest.raises(AuthError) as auth:
        client.next_job(0)
    assert auth.value.status_code == 401 and auth.value.detail == "bad token" and not sleeps

    assert fake.register(FakeFarm.REG_TOKEN) is not None  # now AGENT_TOKEN is an agent's token
    client.set_token(FakeFarm.AGENT_TOKEN)
    fake.fail_next_polls = 5
    with pytest.raises(ServerUnavailable):
        client.next_job(0)
    assert fake.fail_next_polls == 2  # 3 attempts
    assert sleeps == [0.01, 0.02]  # 2 backoffs, exponential (at the top of their full-jitter range)
    fake.fail_next_polls = 1
    assert client.next_job(0) is None  # one 503, then the 204

    fake.stale.add(9)
    failed = JobResult(lease_id="x", status=ResultStatus.failed, error="e", failure_class="runtime_error")
    assert client.post_result(9, failed).accepted is False
    assert client.post_result(10, failed).accepted is True and fake.results[10]["failure_class"] == "runtime_error"
    with pytest.raises(LeaseLostError):
        client.heartbeat(9, "x")
    assert client.heartbeat(10, "x").cancel_requested is False
    client.close()
