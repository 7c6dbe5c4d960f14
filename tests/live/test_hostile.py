"""The server as a hostile client meets it: connection floods, long-poll floods, device takeover,
token replay, oversized and malformed input. Every case talks to real server processes on
127.0.0.1 (and, where the backend matters, to real Postgres); connection counts and waits are
bounded, and every socket a test opens is closed by it."""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server.cli.local import free_port, server_process, stop_process, temporary_postgres_database
from tests.helpers import CAPABILITIES, POSTGRES_ADMIN_URL

REPO = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO / "deploy" / "nginx.conf"
TOKEN = "hostile-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


#: every server of this module runs with these: two polls per agent, five in all, 2 MiB bodies
SETTINGS = {"LATFARM_ADMIN_TOKEN": TOKEN, "LATFARM_WORKER": "false", "LATFARM_MAX_POLLS_PER_AGENT": "2",
            "LATFARM_MAX_POLLS": "5", "LATFARM_MAX_BODY_BYTES": str(2 * 1024 * 1024), "LATFARM_CANARY_EVERY": "0"}
#: what a server logs when it answered 500 (the app's last-resort handler, or uvicorn's)
CRASH_LINES = ("unhandled error on", "Exception in ASGI application")


@contextlib.contextmanager
def farm_process(database_url: str, workdir: Path, **extra: str) -> Iterator[str]:
    """A `latfarm server` process; afterwards, its log must show no request answered 500."""
    port = free_port()
    log = workdir / f"server-{port}.log"
    env = {**SETTINGS, "LATFARM_DATABASE_URL": database_url, "LATFARM_ARTIFACT_DIR": str(workdir / "artifacts"),
           **extra}
    with server_process(env, port, log=log, access_log=False, timeout_s=180):  # a busy host starts slowly
        yield f"http://127.0.0.1:{port}"
    crashes = [line for line in log.read_text().splitlines() if any(crash in line for crash in CRASH_LINES)]
    assert not crashes, f"the server answered 500: {crashes[:3]}"


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `latfarm server` process on a SQLite database of its own."""
    tmp = tmp_path_factory.mktemp("sqlite-farm")
    with farm_process(f"sqlite:///{tmp / 'latfarm.db'}", tmp) as url:
        yield url


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def farm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `latfarm server` process on each backend."""
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_server")
        return
    tmp = tmp_path_factory.mktemp("postgres-farm")
    with temporary_postgres_database(POSTGRES_ADMIN_URL, "latfarm_hostile") as url, farm_process(url, tmp) as server:
        yield server


def api(url: str, token: str | None = TOKEN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=f"{url}/api/v1", headers=headers, timeout=30)


def register(url: str, token: str, name: str, *devices: str) -> httpx.Response:
    with api(url, token) as client:
        return client.post("/agents/register", json={"name": name, "capabilities": CAPABILITIES,
                                                     "devices": [{"name": device} for device in devices]})


def unique(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


# --------------------------------------------------------------------------- the reverse proxy


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError("nginx did not start listening")


@contextlib.contextmanager
def nginx_in_front(upstream: str, workdir: Path) -> Iterator[str]:
    """Debian's nginx, with the shipped deploy/nginx.conf pointed at `upstream` (host:port) and
    listening on a free local port; its pid file, logs and temporary files stay in `workdir`."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if nginx is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx)")
    port = free_port()
    conf = NGINX_CONF.read_text()
    local_paths = "".join(f"    {directive} {workdir / name};\n" for directive, name in (
        ("client_body_temp_path", "body"), ("proxy_temp_path", "proxy"), ("fastcgi_temp_path", "fastcgi"),
        ("uwsgi_temp_path", "uwsgi"), ("scgi_temp_path", "scgi"), ("access_log", "access.log")))
    for shipped, local in (("server server:8000;", f"server {upstream};"), ("listen 8080;", f"listen 127.0.0.1:{port};"),
                           ("http {\n", "http {\n" + local_paths)):
        assert conf.count(shipped) == 1, f"deploy/nginx.conf no longer has {shipped!r} once"
        conf = conf.replace(shipped, local)
    (workdir / "nginx.conf").write_text(conf)
    command = [nginx, "-p", str(workdir), "-c", str(workdir / "nginx.conf"),
               "-g", f"daemon off; user root; pid {workdir / 'nginx.pid'}; error_log {workdir / 'error.log'} warn;"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)


class Flood:
    """Connections a hostile client holds open: idle ones that never send a byte, and slowloris
    ones that trickle a byte per second into their headers or their body, all to 127.0.0.1."""

    SLOW_HEADERS = b"GET /healthz HTTP/1.1\r\nHost: farm\r\nX-Slow: "
    SLOW_BODY = (b"POST /api/v1/devices HTTP/1.1\r\nHost: farm\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000000\r\n\r\n{")

    def __init__(self, port: int, idle: int, slow: int) -> None:
        self.idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(idle)]
        self.slow_headers = [self._open(port, self.SLOW_HEADERS) for _ in range(slow // 2)]
        self.slow_bodies = [self._open(port, self.SLOW_BODY) for _ in range(slow - slow // 2)]
        self.slow = self.slow_headers + self.slow_bodies
        for sock in self.idle + self.slow:
            sock.setblocking(False)
        self._stop = threading.Event()
        self._trickler = threading.Thread(target=self._trickle, daemon=True)
        self._trickler.start()

    @staticmethod
    def _open(port: int, first_bytes: bytes) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(first_bytes)
        return sock

    def _trickle(self) -> None:
        while not self._stop.wait(1.0):
            for sock in self.slow:
                with contextlib.suppress(OSError):
                    sock.send(b"a")

    def still_open(self, socks: list[socket.socket] | None = None) -> int:
        """How many of the connections (default: all) the other side has not closed yet."""
        count = 0
        for sock in self.idle + self.slow if socks is None else socks:
            try:
                count += sock.recv(4096) != b""  # an answer (408) comes just before the close
            except BlockingIOError:
                count += 1
            except OSError:
                pass
        return count

    def close(self) -> None:
        self._stop.set()
        self._trickler.join(timeout=5)
        for sock in self.idle + self.slow:
            sock.close()


def _timed_get(client: httpx.Client, path: str, **kwargs: object) -> tuple[int, float]:
    start = time.perf_counter()
    status = client.get(path, **kwargs).status_code  # type: ignore[arg-type]
    return status, time.perf_counter() - start


def test_the_deployed_proxy_keeps_answering_through_idle_and_slowloris_floods(
        sqlite_server: str, tmp_path: Path) -> None:
    with nginx_in_front(sqlite_server.removeprefix("http://"), tmp_path) as url:
        port = int(url.rsplit(":", 1)[1])
        flood = Flood(port, idle=1000, slow=1000)
        try:
            with httpx.Client(base_url=url, timeout=5) as client:
                answers = [_timed_get(client, path, headers=headers)
                           for _ in range(10) for path, headers in (("/healthz", {}), ("/api/v1/devices", AUTH))]
            held = flood.still_open()
            assert held >= 1990, f"the flood was not in place while the requests ran: {held} of 2000 open"
            assert [status for status, _ in answers] == [200] * 20
            slowest = max(seconds for _, seconds in answers)
            assert slowest < 1.0, f"slowest answer {slowest:.3f} s"
            # the proxy closes connections that have not sent their whole headers within 10 s; one
            # trickling its body gets 10 s between reads, and nginx holds it (the body is buffered
            # before any of it is passed on, so the server never sees that request)
            unfinished = flood.idle + flood.slow_headers
            deadline = time.monotonic() + 20
            while (held := flood.still_open(unfinished)) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert held == 0, f"{held} connections with unfinished headers still open after 20 s"
        finally:
            flood.close()


def test_the_deployed_proxy_caps_header_size(sqlite_server: str, tmp_path: Path) -> None:
    with nginx_in_front(sqlite_server.removeprefix("http://"), tmp_path) as url, \
            httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/healthz", headers={"X-Big": "a" * 8_000}).status_code == 200
        assert client.get("/healthz", headers={"X-Big": "a" * 20_000}).status_code in (400, 431, 494)
        many = {f"X-Big-{i}": "a" * 8_000 for i in range(40)}  # 320 KB of headers in all
        assert client.get("/healthz", headers=many).status_code in (400, 431, 494)
        oversized = client.post("/api/v1/devices", headers=AUTH, content=b"x" * (65 * 1024 * 1024))
        assert oversized.status_code == 413


# --------------------------------------------------------------------------- long polls


def test_long_polls_are_capped_per_agent_and_per_server(sqlite_server: str) -> None:
    first = register(sqlite_server, TOKEN, "poller-1", unique("polled-1")).json()["agent_token"]
    second = register(sqlite_server, TOKEN, "poller-2", unique("polled-2")).json()["agent_token"]
    with api(sqlite_server, first) as one, api(sqlite_server, second) as two:
        while one.get("/agents/me/jobs/next", params={"wait": 0}).status_code == 200:
            pass  # the canary of its device: every poll from now on waits
        while two.get("/agents/me/jobs/next", params={"wait": 0}).status_code == 200:
            pass

    def poll(token: str) -> httpx.Response:
        with api(sqlite_server, token) as client:
            return client.get("/agents/me/jobs/next", params={"wait": 4})

    with ThreadPoolExecutor(16) as pool:
        firsts = [pool.submit(poll, first) for _ in range(12)]
        time.sleep(1.0)  # the first agent's two polls are open: the second's may take the server's other three
        seconds = [pool.submit(poll, second) for _ in range(4)]
        with api(sqlite_server) as admin:
            health = _timed_get(admin, f"{sqlite_server}/healthz")
            listing = _timed_get(admin, "/devices")
        first_statuses = sorted(f.result().status_code for f in firsts)
        second_replies = [f.result() for f in seconds]
    assert first_statuses == [204] * 2 + [429] * 10
    assert sorted(r.status_code for r in second_replies) == [204] * 2 + [429] * 2
    refused = [r for r in second_replies if r.status_code == 429]
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert "this agent" in refused[0].json()["detail"] or "this server" in refused[0].json()["detail"]
    assert health[0] == listing[0] == 200 and max(health[1], listing[1]) < 1.0


# --------------------------------------------------------------------------- agents and their tokens


def test_an_agent_token_serves_only_the_devices_it_was_registered_for(farm: str) -> None:
    mine, theirs = unique("mine"), unique("theirs")
    owner = register(farm, TOKEN, "owner", theirs)
    intruder = register(farm, TOKEN, "intruder", mine)
    assert owner.status_code == intruder.status_code == 201
    token, agent_id = intruder.json()["agent_token"], intruder.json()["agent_id"]

    takeover = register(farm, token, "intruder", mine, theirs)
    assert takeover.status_code == 403, takeover.text
    assert register(farm, token, "intruder", theirs).status_code == 403
    again = register(farm, token, "intruder", mine)
    assert again.status_code == 201 and again.json()["agent_id"] == agent_id

    with api(farm, token) as agent:
        leased = []
        while (reply := agent.get("/agents/me/jobs/next", params={"wait": 0})).status_code == 200:
            leased.append(reply.json()["device"])
        assert reply.status_code == 204 and theirs not in leased and mine in leased
    with api(farm) as admin:
        device = admin.get(f"/devices/{theirs}").json()
        assert device["agents"] == [owner.json()["agent_id"]]
        # serving another device takes an admin or registration token: a new agent
        one_time = admin.post("/agents/registration-tokens").json()["token"]
    both = register(farm, one_time, "intruder", mine, theirs)
    assert both.status_code == 201 and both.json()["agent_id"] != agent_id


def test_a_registration_token_is_spent_exactly_once_under_concurrent_use(farm: str) -> None:
    with api(farm) as admin:
        token = admin.post("/agents/registration-tokens").json()["token"]
    start = threading.Barrier(12)

    def use(i: int) -> int:
        body = {"name": f"racer-{i}", "capabilities": CAPABILITIES, "devices": [{"name": unique(f"race-{i}")}]}
        with api(farm, token) as client:
            assert client.get(f"{farm}/healthz").status_code == 200  # connected before the race starts
            start.wait()
            return client.post("/agents/register", json=body).status_code

    with ThreadPoolExecutor(12) as pool:
        statuses = sorted(pool.map(use, range(12)))
    assert statuses == [201] + [401] * 11, statuses


def test_a_revoked_agent_is_refused_by_every_server_process_and_its_lease_requeued(tmp_path: Path) -> None:
    from server.auth import TOKEN_CACHE_S

    with temporary_postgres_database(POSTGRES_ADMIN_URL, "latfarm_revoke") as url, \
            farm_process(url, tmp_path) as first, farm_process(url, tmp_path) as second:
        device = unique("revoked-dev")
        registered = register(first, TOKEN, "to-revoke", device).json()
        with api(first, registered["agent_token"]) as on_first, api(second, registered["agent_token"]) as on_second:
            lease = on_first.get("/agents/me/jobs/next", params={"wait": 5}).json()  # its device's canary
            assert on_second.get("/agents/me/jobs/next", params={"wait": 0}).status_code == 204  # cached there
            with api(first) as admin:
                revoked = admin.delete(f"/agents/{registered['agent_id']}")
                revoked_at = time.monotonic()
                assert revoked.status_code == 200 and revoked.json()["revoked_at"] and revoked.json()["devices"] == []
                job = admin.get(f"/jobs/{lease['job_id']}").json()
                assert job["status"] == "queued" and job["attempts"] == 0
                listed = {agent["id"]: agent for agent in admin.get("/agents").json()["items"]}
                assert listed[registered["agent_id"]]["revoked_at"] is not None
                assert admin.delete("/agents/999999").status_code == 404
            assert on_first.get("/agents/me/jobs/next", params={"wait": 0}).status_code == 401
            heartbeat = on_first.post(f"/jobs/{lease['job_id']}/heartbeat", json={"lease_id": lease["lease_id"]})
            assert heartbeat.status_code == 401
            while (status := on_second.get("/agents/me/jobs/next", params={"wait": 0}).status_code) != 401:
                assert status == 204
                assert time.monotonic() - revoked_at < TOKEN_CACHE_S + 2, "still accepted past the cache time"
                time.sleep(0.2)
        assert register(second, registered["agent_token"], "to-revoke", device).status_code == 401


# --------------------------------------------------------------------------- bodies and headers


def _raw_request(port: int, head: bytes, timeout_s: float = 5) -> bytes:
    """Send `head` (a request without its body) and read what comes back before `timeout_s`."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(head)
        try:
            return sock.recv(65536)
        except TimeoutError:
            return b""


def test_a_request_without_a_valid_token_is_refused_before_its_body_is_read(farm: str) -> None:
    port = int(farm.rsplit(":", 1)[1])
    for path, token in (("/api/v1/devices", None), ("/api/v1/devices", "wrong"), ("/api/v1/agents/register", None),
                        ("/api/v1/agents/register", "wrong"), ("/api/v1/measurements", "wrong")):
        auth = f"Authorization: Bearer {token}\r\n".encode() if token else b""
        head = (f"POST {path} HTTP/1.1\r\nHost: farm\r\nContent-Type: application/json\r\n"
                f"Content-Length: 1000000\r\n").encode() + auth + b"\r\n"
        start = time.perf_counter()
        answer = _raw_request(port, head)
        assert answer.startswith(b"HTTP/1.1 401"), (path, token, answer[:80])
        assert time.perf_counter() - start < 2


def test_a_chunked_body_over_the_limit_gets_413_as_with_content_length(farm: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"name": "x", "attributes": {"pad": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}}'

    with api(farm) as admin:
        chunked = admin.post("/devices", content=chunks(), headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413, chunked.text
        declared = admin.post("/devices", content=b"{" + b" " * (3 * 1024 * 1024) + b"}",
                              headers={"Content-Type": "application/json"})
        assert declared.status_code == 413
        upload = admin.post("/artifacts", content=chunks())
        assert upload.status_code == 413
    with httpx.Client(base_url=farm, timeout=30) as browser:  # the sign-in form is read before any token
        form = browser.post("/ui/login", content=b"token=" + b"a" * 100_000,
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert form.status_code == 413


def test_a_non_ascii_token_is_refused_not_a_crash(farm: str) -> None:
    bad = "Bearer t\u00f6k\u00e9n".encode("utf-8")
    with httpx.Client(base_url=farm, timeout=30) as client:
        for method, path in (("GET", "/api/v1/devices"), ("POST", "/api/v1/agents/register"),
                             ("GET", "/api/v1/agents/me/jobs/next")):
            reply = client.request(method, path, headers={"Authorization": bad}, json={})
            assert reply.status_code == 401, (path, reply.status_code, reply.text)
        login = client.post("/ui/login", content="token=t%C3%B6k%C3%A9n&next=/ui/devices".encode(),
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert login.status_code == 401
        cookie = client.get("/ui/devices", headers={"Cookie": "latfarm_ui=t\u00f6k\u00e9n".encode("utf-8")})
        assert cookie.status_code == 401
        header = client.get("/ui/devices", headers={"Authorization": bad})
        assert header.status_code == 401


# --------------------------------------------------------------------------- malformed input


def test_deeply_nested_input_is_refused_not_a_crash(farm: str) -> None:
    with api(farm) as admin:
        key = "[" * 4000
        assert admin.post("/architectures", json={"space": "ofa", "key": key}).status_code == 422
        predicted = admin.post("/predict", json={"device": "nowhere", "space": "ofa", "architectures": [key]})
        assert predicted.status_code == 422, predicted.text
        nested: object = 1
        for _ in range(256):
            nested = {"a": nested}
        name = unique("nested")
        assert admin.post("/devices", json={"name": name, "attributes": {"n": nested}}).status_code == 422
        shallow = admin.post("/devices", json={"name": name, "attributes": {"board": {"rev": [1, 2]}}})
        assert shallow.status_code == 201, shallow.text
        assert admin.patch(f"/devices/{name}", json={"attributes": {"n": nested}}).status_code == 422
        assert admin.get(f"/devices/{name}").json()["attributes"] == {"board": {"rev": [1, 2]}}


NB201_KEY = "|nor_conv_1x1~0|+|skip_connect~0|nor_conv_3x3~1|+|skip_connect~0|avg_pool_3x3~1|nor_conv_1x1~2|"


def test_numbers_are_strict_and_finite_on_both_backends(farm: str) -> None:
    device = unique("strict")
    with api(farm) as admin:
        assert admin.post("/devices", json={"name": device}).status_code == 201

        def rows(latency: str) -> httpx.Response:
            body = (f'{{"device": "{device}", "space": "nb201", "rows": '
                    f'[{{"architecture": "{NB201_KEY}", "latency_ms": {latency}}}]}}')
            return admin.post("/measurements", content=body, headers={"Content-Type": "application/json"})

        for refused in ("true", '"12"', "NaN", "Infinity", "-Infinity"):
            assert rows(refused).status_code == 422, refused
        assert rows("12").status_code == 201
        stored = admin.get("/measurements", params={"device": device}).json()["items"]
        assert [row["latency_ms"] for row in stored] == [12.0]
        assert admin.post("/devices", content=f'{{"name": "{unique("nan")}", "attributes": {{"x": NaN}}}}',
                          headers={"Content-Type": "application/json"}).status_code == 422

    registered = register(farm, TOKEN, "finite", unique("finite-dev")).json()
    with api(farm, registered["agent_token"]) as agent:
        lease = agent.get("/agents/me/jobs/next", params={"wait": 5}).json()
        stats = {"n": 30, "median_ms": 1.0, "mean_ms": 1.0, "min_ms": 1.0, "max_ms": 1.0, "p90_ms": 1.0,
                 "iqr_ms": 0.0, "cv": 0.0}
        base = f'"lease_id": "{lease["lease_id"]}", "status": "ok", "stats": {json.dumps(stats)}'

        def result(extra: str) -> httpx.Response:
            return agent.post(f"/jobs/{lease['job_id']}/result", content=f"{{{base}, {extra}}}",
                              headers={"Content-Type": "application/json"})

        for refused in ('"load_ms": NaN', '"load_ms": Infinity', '"first_inference_ms": true',
                        '"provenance": {"clock": NaN}', '"provenance": {"clock": -Infinity}',
                        '"samples_ms": [1.0, NaN]', '"load_ms": "3"'):
            assert result(refused).status_code == 422, refused
        assert result('"load_ms": 3, "provenance": {"clock": 1.5}').status_code == 200


def test_nul_characters_are_refused_on_both_backends(farm: str) -> None:
    with api(farm) as admin:
        assert admin.post("/tokens", json={"name": "a\u0000b", "scopes": ["read"]}).status_code == 422
        assert admin.post("/tokens", json={"name": "ab", "scopes": ["read"]}).status_code == 201
        assert all("\u0000" not in token["name"] for token in admin.get("/tokens").json()["items"])
    assert register(farm, TOKEN, "nul\u0000agent", unique("nul-dev")).status_code == 422


def _onnx_model(external_location: str | None) -> bytes:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones(4, dtype=np.float32), "w")
    if external_location is not None:
        weight.ClearField("raw_data")
        weight.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external_location), ("offset", "0"), ("length", "16")):
            weight.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_an_onnx_upload_with_external_data_is_refused_whatever_file_it_names(farm: str) -> None:
    with api(farm) as admin:
        answers = [admin.post("/artifacts", content=_onnx_model(location))
                   for location in ("pyproject.toml", "no-such-file", "../../etc/passwd")]
        assert [a.status_code for a in answers] == [422] * 3
        assert len({a.json()["detail"] for a in answers}) == 1  # the same answer: nothing to learn
        assert admin.post("/artifacts", content=_onnx_model(None)).status_code == 201


def test_the_agent_takes_its_token_from_a_file_and_keeps_it_out_of_ps(sqlite_server: str, tmp_path: Path) -> None:
    import sys

    help_text = subprocess.run([sys.executable, "-m", "agent", "--help"], capture_output=True, text=True).stdout
    assert "--token-file" in help_text and "ps" in help_text
    with api(sqlite_server) as admin:
        one_time = admin.post("/agents/registration-tokens").json()["token"]
    token_file = tmp_path / "token"
    token_file.write_text(one_time + "\n")
    device = unique("filed")
    command = [sys.executable, "-m", "agent", "--server", sqlite_server, "--token-file", str(token_file),
               "--device", device, "--state-dir", str(tmp_path / "state"), "--cache-dir", str(tmp_path / "cache")]
    with open(tmp_path / "agent.log", "wb") as log:
        agent = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            with api(sqlite_server) as admin:
                deadline = time.monotonic() + 60
                while admin.get(f"/devices/{device}").status_code != 200:
                    assert agent.poll() is None and time.monotonic() < deadline, (tmp_path / "agent.log").read_text()
                    time.sleep(0.3)
            assert one_time.encode() not in Path(f"/proc/{agent.pid}/cmdline").read_bytes()
        finally:
            stop_process(agent)


# --------------------------------------------------------------------------- the database going away


@contextlib.contextmanager
def private_postgres() -> Iterator[tuple[str, Callable[[str], None]]]:
    """A Postgres cluster of this test's own (initdb in a temporary folder, a free port), so that
    it can be stopped and restarted without touching anyone else's databases. Yields its admin URL
    and `pg_ctl(action)`."""
    import glob
    import os
    import pwd
    import tempfile

    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not binaries:
        pytest.skip("no PostgreSQL server binaries (Debian: apt-get install postgresql)")
    bin_dir = Path(binaries[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="latfarm-pg-"))
    port = free_port()
    run_as: dict[str, object] = {}
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid}

    def pg_ctl(action: str) -> None:
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w",
                        "-m", "fast", "-o", options, action], check=True, capture_output=True, timeout=60, **run_as)

    subprocess.run([str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--auth=trust"],
                   check=True, capture_output=True, timeout=120, **run_as)
    pg_ctl("start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", pg_ctl
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            pg_ctl("stop")
        shutil.rmtree(root, ignore_errors=True)


def test_a_database_restart_answers_503_and_the_cli_exits_unavailable(tmp_path: Path) -> None:
    import sys

    with private_postgres() as (admin_url, pg_ctl), temporary_postgres_database(admin_url, "latfarm_restart") as url, \
            farm_process(url, tmp_path) as farm:
        registered = register(farm, TOKEN, "across-restart", unique("restart-dev")).json()
        with api(farm, registered["agent_token"]) as agent, api(farm) as admin:
            assert agent.get("/agents/me/jobs/next", params={"wait": 5}).status_code == 200  # the canary
            with ThreadPoolExecutor(2) as pool:
                poll = pool.submit(agent.get, "/agents/me/jobs/next", params={"wait": 30})
                stop, statuses = threading.Event(), []

                def keep_asking() -> None:
                    with api(farm) as client:
                        while not stop.is_set():
                            statuses.append(client.get("/devices").status_code)
                            time.sleep(0.05)

                asker = pool.submit(keep_asking)
                time.sleep(1)
                pg_ctl("stop")  # the long poll re-checks the queue every 2 s: it meets the stopped database
                time.sleep(3)
                down = admin.get("/devices")
                assert down.status_code == 503 and int(down.headers["Retry-After"]) >= 1
                onboard = subprocess.run(
                    [sys.executable, "-m", "server.cli", "onboard", "somewhere", "--server", farm, "--token", TOKEN],
                    capture_output=True, text=True, timeout=60)
                pg_ctl("start")
                assert poll.result(timeout=40).status_code == 503
                time.sleep(1)
                stop.set()
                asker.result(timeout=10)
            assert set(statuses) <= {200, 503} and 503 in statuses and statuses[-1] == 200, statuses
            assert onboard.returncode == 7, onboard.stderr
            assert "unavailable" in onboard.stderr or "503" in onboard.stderr
            assert admin.get("/devices").status_code == 200
            assert agent.get("/agents/me/jobs/next", params={"wait": 0}).status_code == 204
