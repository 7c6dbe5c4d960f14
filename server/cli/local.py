"""Run a server (in this process or as a `latfarm server` process) and agents beside it: for the
demo, the tests and the benchmarks."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from agent.settings import ENV_VARS as AGENT_ENV_VARS
from server.app import create_app
from server.settings import Settings


@contextmanager
def temporary_postgres_database(admin_url: str, prefix: str = "latfarm_tmp") -> Iterator[str]:
    """A fresh, migrated Postgres database (created through `admin_url`), dropped afterwards."""
    import psycopg

    from server.db import upgrade

    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = f"{admin_url.rpartition('/')[0]}/{name}"
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(settings: Settings) -> Iterator[str]:
    """The API served by uvicorn in a background thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning",
                                           limit_concurrency=settings.max_concurrency))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server failed to start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def server_process(env: dict[str, str], port: int, workers: int = 1, log: Path | None = None,
                   timeout_s: float = 60.0, access_log: bool = True) -> Iterator[subprocess.Popen[bytes]]:
    """`latfarm server` as a child process with `env` (LATFARM_* settings) added; yields once it
    answers /healthz and stops it (SIGTERM, then SIGKILL) afterwards."""
    out = open(log, "ab") if log is not None else subprocess.DEVNULL
    command = [sys.executable, "-m", "server.cli", "server", "--port", str(port), "--workers", str(workers),
               "--access-log" if access_log else "--no-access-log"]
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(f"http://127.0.0.1:{port}"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start (exit code {process.poll()})")
            time.sleep(0.2)
        yield process
    finally:
        stop_process(process)
        if log is not None:
            out.close()  # type: ignore[union-attr]


@contextmanager
def worker_process(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`latfarm worker` as a child process with `env` (LATFARM_* settings) added; stopped afterwards."""
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "server.cli", "worker"], env={**os.environ, **env},
                                   stdout=out, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            stop_process(process)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def running_agent(url: str, token: str, device: str, threads: int, workdir: Path,
                  extra_args: Sequence[str] = ()) -> Iterator[subprocess.Popen[bytes]]:
    """A real `latfarm-agent` process serving `device`; its log goes to workdir/agent.log."""
    log = open(workdir / "agent.log", "ab")
    # the token goes in the environment: a flag would show in `ps` to every user of the host
    command = [sys.executable, "-m", "agent", "--server", url, "--device", device,
               "--threads", str(threads), "--cache-dir", str(workdir / "agent-cache"),
               "--state-dir", str(workdir / "agent-state"), *extra_args]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, AGENT_ENV_VARS["token"]: token})
    try:
        yield process
    finally:
        stop_process(process)
        log.close()
