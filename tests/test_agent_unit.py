"""Agent unit tests on real parts: a real ONNX model, real child processes, real HTTP servers."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import signal
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import __version__
from agent.cache import ArtifactCache, ArtifactDownloadError, ArtifactError, ArtifactIntegrityError
from agent.capabilities import default_device_name, detect_capabilities, device_attributes
from agent.cli import main as cli_main
from agent.client import ServerClient
from agent.protocol import PROTOCOL_VERSION, JobResult, Preset, TimingProtocol
from agent.settings import ENV_VARS, AgentSettings
from agent.timing import compute_stats, measure
from agent.worker import Worker

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = TimingProtocol(preset=Preset.quick, warmup_runs=2, min_runs=20, min_seconds=0.05, max_runs=60, timeout_s=60)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32), "W")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "conv_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32, 32])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("model") / "conv_relu.onnx"
    onnx.save(model, str(path))
    return path


class _Server:
    """A stdlib HTTP server on a free 127.0.0.1 port, in a thread."""

    def __init__(self, handler: Callable[..., http.server.BaseHTTPRequestHandler]) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[_Server, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    server = _Server(functools.partial(_QuietFiles, directory=str(root)))
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
    assert outcome.providers == ["CPUExecutionProvider"]
    assert outcome.inputs == {"x": [1, 3, 32, 32]}
    if hasattr(os, "sched_getaffinity"):
        assert outcome.affinity is not None and len(outcome.affinity) == 1
        assert set(outcome.affinity) <= os.sched_getaffinity(0)
    assert outcome.pid is not None and outcome.pid != os.getpid() and _pid_gone(outcome.pid)


def test_measure_timeout_kills_child(model_path: Path) -> None:
    slow = FAST.model_copy(update={"min_seconds": 120.0, "max_runs": 1_000_000, "timeout_s": 1.5})
    outcome = measure(model_path, slow, threads=1)
    assert not outcome.ok
    assert outcome.failure_class == "timeout"
    assert outcome.stats is None and outcome.error
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


# ---------------------------------------------------------------------------------------- cache


def test_cache_downloads_verifies_and_hits(file_server: tuple[_Server, Path], tmp_path: Path) -> None:
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
    assert default_device_name(4, "bench01.lab.example") == "bench01-ort-4t-b1"
    assert default_device_name(1, "odd host_name!") == "odd-host_name-ort-1t-b1"


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
    settings = AgentSettings.load()
    assert settings.server == "http://env:8000" and settings.token == "env-token"
    assert settings.devices == ["a-ort-2t-b1", "b-ort-2t-b1"] and settings.threads == 2
    assert settings.cache_dir == tmp_path and settings.name
    settings = AgentSettings.load({"server": "https://flag", "threads": 3, "devices": None})
    assert settings.server == "https://flag" and settings.threads == 3 and settings.token == "env-token"
    assert settings.devices == ["a-ort-2t-b1", "b-ort-2t-b1"]
    monkeypatch.delenv(ENV_VARS["cache_dir"])
    assert AgentSettings.load().cache_dir == Path("~/.cache/latfarm/artifacts").expanduser()


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
        "import sys, agent.cli, agent.worker, agent.timing, agent.client, agent.cache, agent.capabilities\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'server', 'predictor', 'torch', 'fastapi', 'sqlalchemy', 'typer', 'pydantic_settings', 'onnx'})\n"
        "print(','.join(bad))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "", f"agent imports pulled in: {done.stdout.strip()}"


# ----------------------------------------------------------------- worker against a fake server


class FakeFarm:
    """The agent half of the server protocol, in memory, served by a stdlib HTTP handler."""

    REG_TOKEN = "reg-secret"
    AGENT_TOKEN = "agent-secret"

    def __init__(self, artifacts: dict[str, bytes]) -> None:
        self.artifacts = artifacts
        self.jobs: list[dict[str, Any]] = []  # leases handed out in order
        self.results: dict[int, dict[str, Any]] = {}
        self.registrations: list[dict[str, Any]] = []
        self.heartbeats: dict[int, int] = {}
        self.cancel: set[int] = set()
        self.stale: set[int] = set()
        self.fail_next_polls = 0  # answer this many polls with 503 first
        self.lock = threading.Lock()

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        farm = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _send(self, status: int, body: Any = None, raw: bytes | None = None) -> None:
                data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
                self.send_response(status)
                if raw is None and body is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _auth(self, token: str) -> bool:
                if self.headers.get("Authorization") != f"Bearer {token}":
                    self._send(401, {"detail": "bad token"})
                    return False
                return True

            def _body(self) -> dict[str, Any]:
                return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

            def do_GET(self) -> None:  # noqa: N802
                if self.path.startswith("/api/v1/agents/me/jobs/next"):
                    if not self._auth(farm.AGENT_TOKEN):
                        return
                    with farm.lock:
                        if farm.fail_next_polls:
                            farm.fail_next_polls -= 1
                            return self._send(503, {"detail": "warming up"})
                        pending = [j for j in farm.jobs if not j.get("_leased")]
                        if pending:
                            pending[0]["_leased"] = True
                            lease = {k: v for k, v in pending[0].items() if not k.startswith("_")}
                    if not pending:
                        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                        time.sleep(min(float(query.get("wait", ["0"])[0]), 10.0))
                        return self._send(204)
                    return self._send(200, lease)
                if self.path.startswith("/api/v1/artifacts/"):
                    sha = self.path.rsplit("/", 1)[-1]
                    if sha not in farm.artifacts:
                        return self._send(404, {"detail": "no such artifact"})
                    return self._send(200, raw=farm.artifacts[sha])
                self._send(404, {"detail": "not found"})

            def do_POST(self) -> None:  # noqa: N802
                if self.path == "/api/v1/agents/register":
                    if not self._auth(farm.REG_TOKEN):
                        return
                    farm.registrations.append(self._body())
                    return self._send(
                        201,
                        {"agent_id": 7, "agent_token": farm.AGENT_TOKEN, "poll_wait_s": 0.2,
                         "heartbeat_s": 0.2, "lease_ttl_s": 30},
                    )
                if not self._auth(farm.AGENT_TOKEN):
                    return
                parts = self.path.strip("/").split("/")  # api v1 jobs <id> heartbeat|result
                if len(parts) == 5 and parts[2] == "jobs":
                    job_id, action, body = int(parts[3]), parts[4], self._body()
                    with farm.lock:
                        if job_id in farm.stale:
                            return self._send(409, {"detail": "stale lease"})
                        if action == "heartbeat":
                            farm.heartbeats[job_id] = farm.heartbeats.get(job_id, 0) + 1
                            return self._send(
                                200, {"lease_expires_at": "2100-01-01T00:00:00Z",
                                      "cancel_requested": job_id in farm.cancel},
                            )
                        if action == "result":
                            farm.results[job_id] = body
                            return self._send(200, {"ok": True})
                self._send(404, {"detail": "not found"})

        return Handler

    def add_job(self, job_id: int, sha: str, protocol: TimingProtocol, device: str) -> None:
        self.jobs.append({
            "job_id": job_id, "lease_id": f"lease-{job_id}", "lease_expires_at": "2100-01-01T00:00:00Z",
            "device": device, "threads": 1,
            "artifact": {"sha256": sha, "format": "onnx", "size_bytes": len(self.artifacts.get(sha, b"")),
                         "url": f"/api/v1/artifacts/{sha}"},
            "protocol": protocol.model_dump(mode="json"),
        })


@pytest.fixture
def farm(model_path: Path) -> Iterator[Callable[[], tuple[FakeFarm, _Server]]]:
    servers: list[_Server] = []

    def make() -> tuple[FakeFarm, _Server]:
        data = model_path.read_bytes()
        fake = FakeFarm({hashlib.sha256(data).hexdigest(): data})
        server = _Server(fake.handler())
        servers.append(server)
        return fake, server

    yield make
    for server in servers:
        server.close()


def test_worker_runs_jobs_end_to_end(farm: Callable[[], tuple[FakeFarm, _Server]], tmp_path: Path) -> None:
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
    fake.cancel.add(2)
    fake.stale.add(4)
    fake.fail_next_polls = 1  # a 503 is retried

    settings = AgentSettings(
        server=server.url, token=FakeFarm.REG_TOKEN, devices=[device], threads=1,
        cache_dir=tmp_path / "cache", name="test-agent", exit_when_idle=True, poll_wait_s=0,
    )
    client = ServerClient(settings.server, settings.token, backoff_s=0.01, max_attempts=3)
    worker = Worker(settings, client=client)
    assert worker.run(install_signal_handlers=False) == 0
    assert worker.jobs_done == 5

    (reg,) = fake.registrations
    assert reg["name"] == "test-agent" and reg["devices"][0]["name"] == device
    assert reg["devices"][0]["attributes"]["threads"] == 1

    ok = JobResult.model_validate(fake.results[1])
    assert ok.status.value == "ok" and ok.lease_id == "lease-1"
    assert ok.stats is not None and ok.stats.n == len(ok.samples_ms) >= FAST.min_runs
    prov = ok.provenance
    assert prov["artifact_sha256"] == sha and prov["runtime"] == "onnxruntime" and prov["threads"] == 1
    assert prov["agent_version"] == __version__ and prov["protocol_version"] == PROTOCOL_VERSION
    assert prov["preset"] == "quick" and prov["providers"] == ["CPUExecutionProvider"]
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
    assert (tmp_path / "cache" / sha).is_file()


def test_worker_refused_registration_exits_1(farm: Callable[[], tuple[FakeFarm, _Server]], tmp_path: Path) -> None:
    _, server = farm()
    settings = AgentSettings(server=server.url, token="wrong", cache_dir=tmp_path, exit_when_idle=True)
    assert Worker(settings).run(install_signal_handlers=False) == 1


def _start_agent_cli(server: _Server, tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS.values()}
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "--server", server.url, "--token", FakeFarm.REG_TOKEN,
         "--device", "testhost-ort-1t-b1", "--cache-dir", str(tmp_path / "cache"), *extra],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
def test_cli_sigterm_during_long_poll_exits_cleanly(
    farm: Callable[[], tuple[FakeFarm, _Server]], tmp_path: Path
) -> None:
    fake, server = farm()
    proc = _start_agent_cli(server, tmp_path, "--poll-wait", "8")
    try:
        _wait_for(lambda: bool(fake.registrations))
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
    farm: Callable[[], tuple[FakeFarm, _Server]], tmp_path: Path
) -> None:
    fake, server = farm()
    sha = next(iter(fake.artifacts))
    fake.add_job(11, sha, FAST.model_copy(update={"min_seconds": 2.0, "max_runs": 1_000_000}), "testhost-ort-1t-b1")
    proc = _start_agent_cli(server, tmp_path, "--poll-wait", "0.2")
    try:
        _wait_for(lambda: fake.heartbeats.get(11, 0) >= 1)  # the job is being measured
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    result = JobResult.model_validate(fake.results[11])
    assert result.status.value == "ok" and result.stats is not None
    assert "job 11 device=testhost-ort-1t-b1" in out and "median=" in out


def test_client_retries_then_gives_up_and_maps_errors(farm: Callable[[], tuple[FakeFarm, _Server]]) -> None:
    from agent.client import AuthError, LeaseLostError, ServerUnavailable
    from agent.protocol import ResultStatus

    fake, server = farm()
    sleeps: list[float] = []
    client = ServerClient(server.url, "wrong-token", max_attempts=3, backoff_s=0.01, sleep=sleeps.append)
    with pytest.raises(AuthError) as auth:
        client.next_job(0)
    assert auth.value.status_code == 401 and auth.value.detail == "bad token" and not sleeps

    client.set_token(FakeFarm.AGENT_TOKEN)
    fake.fail_next_polls = 5
    with pytest.raises(ServerUnavailable):
        client.next_job(0)
    assert len(sleeps) == 2 and fake.fail_next_polls == 2  # 3 attempts, 2 backoffs
    fake.fail_next_polls = 1
    assert client.next_job(0) is None  # one 503, then the 204

    fake.stale.add(9)
    failed = JobResult(lease_id="x", status=ResultStatus.failed, error="e", failure_class="runtime_error")
    assert client.post_result(9, failed) is False
    assert client.post_result(10, failed) is True and fake.results[10]["failure_class"] == "runtime_error"
    with pytest.raises(LeaseLostError):
        client.heartbeat(9, "x")
    assert client.heartbeat(10, "x").cancel_requested is False
    client.close()
