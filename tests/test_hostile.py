"""The server as a hostile client meets it: connection floods, long-poll floods, device takeover,
token replay, oversized and malformed input. Every case talks to real server processes on
127.0.0.1 (and, where the backend matters, to real Postgres); connection counts and waits are
bounded, and every socket a test opens is closed by it."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.local import free_port, server_process, stop_process

REPO = Path(__file__).resolve().parents[1]
NGINX_CONF = REPO / "deploy" / "nginx.conf"
TOKEN = "hostile-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def sqlite_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"LATFARM_DATABASE_URL": f"sqlite:///{tmp_path / 'latfarm.db'}", "LATFARM_ADMIN_TOKEN": TOKEN,
            "LATFARM_ARTIFACT_DIR": str(tmp_path / "artifacts"), "LATFARM_WORKER": "false", **extra}


@pytest.fixture
def sqlite_server(tmp_path: Path) -> Iterator[str]:
    """A `latfarm server` process on a SQLite database of its own."""
    port = free_port()
    with server_process(sqlite_env(tmp_path), port, log=tmp_path / "server.log", access_log=False):
        yield f"http://127.0.0.1:{port}"


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
