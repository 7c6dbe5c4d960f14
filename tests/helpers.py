"""What more than one test module uses: constants, waiting, a pre-trained base predictor, error
and metrics checks, tiny models, for the agent's tests a fake farm speaking the agent protocol and
for the server's a scripted agent.
(Fixtures are in the conftest.py files; no test module imports another.)"""

from __future__ import annotations

import http.server
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import onnx
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families

from agent.client import ServerClient
from agent.protocol import Preset, Runtime, TimingProtocol
from agent.settings import ENV_VARS, AgentSettings
from predictor.datasets import find_datasets
from server.services.onboarding import REMEASUREMENTS

REPO = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = os.environ.get("LATFARM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DATASETS = find_datasets()
ADMIN_TOKEN = "test-admin-token"
#: the example third-party space package (examples/chain_space), its import root
CHAIN_SPACE_PACKAGE = REPO / "examples" / "chain_space"
NB201_KEY = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"
#: an agent's capability report, for tests that speak the agent protocol themselves
CAPABILITIES = {"hostname": "h", "cpu_model": "c", "cpu_cores": 1, "memory_bytes": 1, "os": "linux",
                "python": "3", "agent_version": "0"}


class ScriptedAgent:
    """Speaks the agent protocol over HTTP and posts the timings a test chooses."""

    def __init__(self, admin: httpx.Client, name: str, devices: dict[str, dict[str, object]]) -> None:
        reply = admin.post("/agents/register", json={
            "name": name, "capabilities": CAPABILITIES,
            "devices": [{"name": device, "attributes": attributes} for device, attributes in devices.items()]})
        assert reply.status_code == 201, reply.text
        self.registration = reply.json()
        self.http = httpx.Client(base_url=admin.base_url, timeout=60,
                                 headers={"Authorization": f"Bearer {self.registration['agent_token']}"})

    def claim(self, wait: float = 0) -> dict:
        """The next lease; fails the test when none comes within `wait` s."""
        reply = self.http.get("/agents/me/jobs/next", params={"wait": wait})
        assert reply.status_code == 200, f"no lease within {wait} s: {reply.status_code} {reply.text}"
        return reply.json()

    def finish(self, lease: dict, median_ms: float = 10.0, samples: list[float] | None = None) -> dict:
        """Post `samples` (default: steady and long enough for every preset's flags) as the timing."""
        samples = [median_ms] * 60 if samples is None else samples
        stats = {"n": len(samples), "median_ms": median_ms, "mean_ms": median_ms, "min_ms": min(samples),
                 "max_ms": max(samples), "p90_ms": median_ms, "iqr_ms": 0.0, "cv": 0.0}
        return self.post(lease, {"status": "ok", "stats": stats, "samples_ms": samples})

    def fail(self, lease: dict, failure_class: str) -> dict:
        return self.post(lease, {"status": "failed", "failure_class": failure_class, "error": "scripted"})

    def post(self, lease: dict, body: dict) -> dict:
        reply = self.http.post(f"/jobs/{lease['job_id']}/result", json={"lease_id": lease["lease_id"], **body})
        assert reply.status_code == 200, reply.text
        return reply.json()

    def pass_canary(self, median_ms: float = 10.0) -> None:
        assert self.finish(self.claim(wait=5), median_ms)["kind"] == "canary"


def write_dist_info(root: Path, distribution: str, spaces: dict[str, str]) -> None:
    """The metadata an install of `distribution` leaves in `root` (a sys.path entry), registering
    `spaces` (name -> "module:attribute") in the `latfarm.spaces` entry-point group."""
    info = root / f"{distribution.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in spaces.items())
    (info / "entry_points.txt").write_text(f"[latfarm.spaces]\n{lines}")


def onboarding_jobs(samples: int, rounds: list[dict[str, Any]]) -> int:
    """The jobs an onboarding of `samples` architectures runs: one each, and `REMEASUREMENTS`
    more for each architecture a round re-measures (a suspect or untrusted sample)."""
    return samples + REMEASUREMENTS * sum(len(round_["remeasuring"]) for round_ in rounds)


def wait_until(predicate: Callable[[], Any], timeout_s: float = 120, poll_s: float = 0.3) -> Any:
    """The predicate's first truthy answer, polled every `poll_s` s; fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def pretrained(api: httpx.Client, space: str = "nb201") -> dict[str, Any]:
    """The newest base predictor of `space`; pre-trains one through the API (and the server's
    training worker) when there is none."""
    bases = [p for p in api.get("/predictors", params={"space": space}).json()["items"] if p["kind"] == "base"]
    if bases:
        return bases[-1]
    task = api.post("/predictors/pretrain", json={"space": space})
    assert task.status_code == 202, task.text
    def finished() -> dict | None:
        state = api.get(f"/tasks/{task.json()['id']}").json()
        return state if state["status"] in ("done", "failed") else None

    done = wait_until(finished, 900, 1.0)
    assert done["status"] == "done", done
    return api.get(f"/predictors/{done['predictor_id']}").json()


def registered(api: httpx.Client, device: str) -> dict[str, Any] | None:
    """The device's record once an agent serves it, else None."""
    response = api.get(f"/devices/{device}")
    return response.json() if response.status_code == 200 and response.json()["agents"] else None


def scrape(farm_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics, fetched without a token, as {(sample name, labels): value}."""
    reply = httpx.get(f"{farm_url}/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(reply.text) for sample in family.samples}


def assert_json_error(response: httpx.Response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"]
    if field is not None:
        assert field in body["field"], body
    return body


def tiny_onnx() -> bytes:
    node = helper.make_node("Relu", ["input"], ["output"])
    graph = helper.make_graph(
        [node], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def small_cnn(width: int, depth: int, resolution: int, seed: int) -> bytes:
    """A plain CNN of its own (not from any space), random weights, as ONNX bytes."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 3, padding=1, groups=1), nn.BatchNorm2d(width), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    model = nn.Sequential(*layers).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, 3, resolution, resolution),), buffer,  # type: ignore[arg-type]  # the TorchScript exporter (dynamo=False) takes a file object too
                          dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["output"])
    return buffer.getvalue()


def unparsable_model() -> bytes:
    """A valid ONNX model whose middle node is an op of an unknown domain: no shape for its output."""
    graph = helper.make_graph(
        [helper.make_node("Mystery", ["input"], ["hidden"], name="mystery_node", domain="com.example"),
         helper.make_node("Relu", ["hidden"], ["output"], name="relu")],
        "unparsable", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", "c", "h", "w"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


# ---- the agent's tests: a fake farm speaking the agent protocol, test models, test settings ----

#: a quick timing protocol for test models
FAST = TimingProtocol(preset=Preset.quick, warmup_runs=2, min_runs=20, min_seconds=0.05, max_runs=60, timeout_s=60)


def save_onnx_model(path: Path, nodes: list[Any], inputs: list[Any], outputs: list[Any], *,
                initializers: list[Any] | None = None, opset: int = 13) -> Path:
    from onnx import helper

    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


class LocalServer:
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


class UpperBoundRng(random.Random):
    """An RNG whose `uniform` always returns the upper bound: jitter at its widest, deterministic."""

    def uniform(self, a: float, b: float) -> float:
        return b


class FakeFarm:
    """The agent half of the server protocol, in memory, served by a stdlib HTTP handler.

    Registration with REG_TOKEN creates an agent (the first gets id 7 and AGENT_TOKEN); with the
    token of a known agent it re-registers that agent (same id and token). `results_down` answers
    result posts with 503; `refuse_results` answers a job's result posts with the given status.
    """

    REG_TOKEN = "reg-secret"
    AGENT_TOKEN = "agent-secret"
    FIRST_AGENT_ID = 7

    def __init__(self, artifacts: dict[str, bytes]) -> None:
        self.artifacts = artifacts
        self.jobs: list[dict[str, Any]] = []  # leases handed out in order
        self.results: dict[int, dict[str, Any]] = {}
        self.agents: dict[str, int] = {}  # agent token -> agent id
        self.registrations: list[dict[str, Any]] = []  # request bodies, "_token": the token presented
        self.heartbeats: dict[int, int] = {}
        self.polls: list[float] = []  # the long-poll waits asked for
        self.downloads = 0
        self.cancel: set[int] = set()
        self.stale: set[int] = set()
        self.fail_next_polls = 0  # answer this many polls with 503 first
        self.results_down = False
        self.result_posts = 0
        self.refuse_results: dict[int, int] = {}
        self.requests: list[str] = []  # "METHOD /path" of every request, in order
        self.lock = threading.Lock()

    def register(self, token: str | None) -> dict[str, Any] | None:
        with self.lock:
            if token == self.REG_TOKEN:
                agent_id = self.FIRST_AGENT_ID + len(self.agents)
                agent_token = self.AGENT_TOKEN if not self.agents else f"{self.AGENT_TOKEN}-{agent_id}"
                self.agents[agent_token] = agent_id
            elif token in self.agents:
                agent_token, agent_id = token, self.agents[token]
            else:
                return None
        return {"agent_id": agent_id, "agent_token": agent_token, "poll_wait_s": 0.2, "heartbeat_s": 0.2,
                "lease_ttl_s": 30}

    def lease_pending(self) -> dict[str, Any] | None:
        """Lease the first job not leased yet (call holding the lock)."""
        pending = [j for j in self.jobs if not j.get("_leased")]
        if not pending:
            return None
        pending[0]["_leased"] = True
        return {k: v for k, v in pending[0].items() if not k.startswith("_")}

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        farm = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any = None, raw: bytes | None = None) -> None:
                data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
                self.send_response(status)
                if raw is None and body is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def parse_request(self) -> bool:
                parsed = super().parse_request()
                if parsed:
                    farm.requests.append(f"{self.command} {urllib.parse.urlsplit(self.path).path}")
                return parsed

            def _token(self) -> str | None:
                header = self.headers.get("Authorization", "")
                return header.removeprefix("Bearer ") if header.startswith("Bearer ") else None

            def _auth(self) -> bool:
                if self._token() not in farm.agents:
                    self._send(401, {"detail": "bad token"})
                    return False
                return True

            def _body(self) -> dict[str, Any]:
                return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

            def do_GET(self) -> None:
                if self.path.startswith("/api/v1/agents/me/jobs/next"):
                    if not self._auth():
                        return
                    query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                    wait = float(query.get("wait", ["0"])[0])
                    with farm.lock:
                        farm.polls.append(wait)
                        if farm.fail_next_polls:
                            farm.fail_next_polls -= 1
                            return self._send(503, {"detail": "warming up"})
                        lease = farm.lease_pending()
                    if lease is None:
                        time.sleep(min(wait, 10.0))
                        return self._send(204)
                    return self._send(200, lease)
                if self.path.startswith("/api/v1/artifacts/"):
                    sha = self.path.rsplit("/", 1)[-1]
                    if sha not in farm.artifacts:
                        return self._send(404, {"detail": "no such artifact"})
                    with farm.lock:
                        farm.downloads += 1
                    return self._send(200, raw=farm.artifacts[sha])
                self._send(404, {"detail": "not found"})

            def do_POST(self) -> None:
                if self.path == "/api/v1/agents/register":
                    body = self._body()
                    reply = farm.register(self._token())
                    if reply is None:
                        return self._send(401, {"detail": "bad token"})
                    farm.registrations.append({**body, "_token": self._token()})
                    return self._send(201, reply)
                if not self._auth():
                    return
                url = urllib.parse.urlsplit(self.path)
                parts = url.path.strip("/").split("/")  # api v1 jobs <id> heartbeat|result
                if len(parts) == 5 and parts[2] == "jobs":
                    job_id, action, body = int(parts[3]), parts[4], self._body()
                    with farm.lock:
                        if action == "result":
                            farm.result_posts += 1
                            if farm.results_down:
                                return self._send(503, {"detail": "database unavailable"})
                            if job_id in farm.refuse_results:
                                return self._send(farm.refuse_results[job_id], {"detail": "refused"})
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
                            lease_next = urllib.parse.parse_qs(url.query).get("lease_next") == ["true"]
                            return self._send(200, {"next_lease": farm.lease_pending() if lease_next else None})
                self._send(404, {"detail": "not found"})

        return Handler

    def add_job(self, job_id: int, sha: str, protocol: TimingProtocol, device: str, *,
                runtime: Runtime = Runtime.onnxruntime, provider: str | None = None,
                artifact_format: str | None = None) -> None:
        fmt = artifact_format or ("torch_export" if runtime is Runtime.pytorch else "onnx")
        self.jobs.append({
            "job_id": job_id, "lease_id": f"lease-{job_id}", "lease_expires_at": "2100-01-01T00:00:00Z",
            "device": device, "threads": 1, "runtime": runtime.value, "provider": provider,
            "artifact": {"sha256": sha, "format": fmt, "size_bytes": len(self.artifacts.get(sha, b"")),
                         "url": f"/api/v1/artifacts/{sha}"},
            "protocol": protocol.model_dump(mode="json"),
        })


def agent_settings(url: str, tmp_path: Path, **overrides: Any) -> AgentSettings:
    """Settings of a test agent of the server at `url`; its cache and state live under `tmp_path`."""
    values: dict[str, Any] = {
        "server": url, "token": FakeFarm.REG_TOKEN, "devices": ["testhost-ort-1t-b1"], "threads": 1,
        "cache_dir": tmp_path / "cache", "state_dir": tmp_path / "state", "name": "test-agent",
        "exit_when_idle": True, "poll_wait_s": 0,
    }
    return AgentSettings(**{**values, **overrides})


def fast_client(settings: AgentSettings, **overrides: Any) -> ServerClient:
    """A client whose retries take milliseconds."""
    return ServerClient(settings.server, settings.token, **{"backoff_s": 0.01, "max_attempts": 3, **overrides})


def start_agent_cli(server: LocalServer, tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS.values()}
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "--server", server.url, "--token", FakeFarm.REG_TOKEN,
         "--device", "testhost-ort-1t-b1", "--cache-dir", str(tmp_path / "cache"),
         "--state-dir", str(tmp_path / "state"), *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)
