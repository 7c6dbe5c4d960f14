"""Run a server in this process and an agent beside it: for the demo and the tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from server.app import create_app
from server.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(settings: Settings) -> Iterator[str]:
    """The API served by uvicorn in a background thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
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
def running_agent(url: str, token: str, device: str, threads: int, workdir: Path,
                  extra_args: Sequence[str] = ()) -> Iterator[subprocess.Popen[bytes]]:
    """A real `latfarm-agent` process serving `device`; its log goes to workdir/agent.log."""
    log = open(workdir / "agent.log", "ab")
    command = [sys.executable, "-m", "agent", "--server", url, "--token", token, "--device", device,
               "--threads", str(threads), "--cache-dir", str(workdir / "agent-cache"), *extra_args]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
