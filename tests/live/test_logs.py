"""Structured logs: request ids from the middleware to uvicorn's access lines, JSON output of a
real `latfarm server`, and secrets masked before anything is written."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from contextvars import copy_context
from pathlib import Path

import httpx
import pytest

from server.cli.local import free_port, server_process, temporary_postgres_database
from server.logs import REQUEST_ID, MaskSecrets, RequestIdFilter
from tests.helpers import ADMIN_TOKEN, POSTGRES_ADMIN_URL


def json_lines(log: Path) -> list[dict]:
    lines = log.read_text().splitlines()
    assert lines
    return [json.loads(line) for line in lines]  # every line is one JSON object


def access_lines(records: list[dict]) -> dict[str, dict]:
    return {record["request_id"]: record for record in records if record["logger"] == "uvicorn.access"}


@pytest.fixture(scope="module")
def json_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`latfarm server` on SQLite with LATFARM_LOG_FORMAT=json; yields its URL and log file."""
    tmp = tmp_path_factory.mktemp("json-server")
    env = {"LATFARM_DATABASE_URL": f"sqlite:///{tmp / 'x.db'}", "LATFARM_ADMIN_TOKEN": ADMIN_TOKEN,
           "LATFARM_ARTIFACT_DIR": str(tmp / "artifacts"), "LATFARM_LOG_FORMAT": "json"}
    port = free_port()
    with server_process(env, port, log=tmp / "server.log"):
        yield f"http://127.0.0.1:{port}", tmp / "server.log"


def test_request_id_is_echoed_and_logged_as_json(json_server: tuple[str, Path]) -> None:
    url, log = json_server
    # the token travels in the header and, as some clients do, in the query string
    response = httpx.get(f"{url}/api/v1/devices", params={"token": ADMIN_TOKEN},
                         headers={"X-Request-ID": "abc123", "Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "abc123"
    records = json_lines(log)
    assert all({"timestamp", "level", "logger", "message", "request_id"} <= record.keys() for record in records)
    line = access_lines(records)["abc123"]
    assert line["level"] == "INFO"
    assert "GET /api/v1/devices?token=*** HTTP/1.1" in line["message"]
    assert ADMIN_TOKEN not in log.read_text()


@pytest.mark.parametrize("given", [None, "two words", "x" * 129])
def test_missing_or_invalid_request_id_is_generated(json_server: tuple[str, Path], given: str | None) -> None:
    url, log = json_server
    response = httpx.get(f"{url}/nothing-here", headers={"X-Request-ID": given} if given else {})
    assert response.status_code == 404
    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert "/nothing-here" in access_lines(json_lines(log))[request_id]["message"]


def test_generated_request_id_in_process(server_url: str) -> None:
    ids = {httpx.get(f"{server_url}/healthz").headers["x-request-id"] for _ in range(2)}
    assert len(ids) == 2 and all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in ids)


def test_workers_log_json_with_request_ids(tmp_path: Path) -> None:
    """Worker processes (--workers 2, Postgres) start with bare logging; they configure it too."""
    with temporary_postgres_database(POSTGRES_ADMIN_URL, "latfarm_logs") as url:
        env = {"LATFARM_DATABASE_URL": url, "LATFARM_ADMIN_TOKEN": ADMIN_TOKEN,
               "LATFARM_ARTIFACT_DIR": str(tmp_path / "artifacts"), "LATFARM_LOG_FORMAT": "json"}
        port = free_port()
        with server_process(env, port, workers=2, log=tmp_path / "server.log"):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                for n in range(4):
                    assert client.get("/healthz", headers={"X-Request-ID": f"w{n}"}).status_code == 200
    records = json_lines(tmp_path / "server.log")
    assert sum(record["message"].startswith("Started server process") for record in records) == 2
    assert {"w0", "w1", "w2", "w3"} <= access_lines(records).keys()


def record(msg: str, *args: object, exc_info: bool = False) -> logging.LogRecord:
    return logging.LogRecord("t", logging.INFO, __file__, 1, msg, args, sys.exc_info() if exc_info else None)


@pytest.mark.parametrize(("msg", "args", "expected"), [
    ("Authorization: Bearer %s", ("s3cr.et-_tok",), "Authorization: Bearer ***"),
    ("headers {'authorization': 'bearer s3cret'}", (), "headers {'authorization': 'bearer ***'}"),
    ('"GET /api/v1/jobs?token=%s&wait=1 HTTP/1.1" %d', ("s3cret", 200),
     '"GET /api/v1/jobs?token=***&wait=1 HTTP/1.1" 200'),
    ("agent registered with access_token=s3cret", (), "agent registered with access_token=***"),
])
def test_secrets_are_masked(msg: str, args: tuple[object, ...], expected: str) -> None:
    rec = record(msg, *args)
    assert MaskSecrets().filter(rec)
    assert rec.getMessage() == expected


def test_messages_without_secrets_are_left_alone() -> None:
    rec = record("job %d: %s tokens", 7, "no")
    MaskSecrets().filter(rec)
    assert (rec.msg, rec.args, rec.getMessage()) == ("job %d: %s tokens", (7, "no"), "job 7: no tokens")


def test_exception_text_is_masked() -> None:
    try:
        raise RuntimeError("refused: Authorization: Bearer s3cret")
    except RuntimeError:
        rec = record("request failed", exc_info=True)
    MaskSecrets().filter(rec)
    formatted = logging.Formatter().format(rec)
    assert "RuntimeError: refused: Authorization: Bearer ***" in formatted
    assert "s3cret" not in formatted


def test_request_id_filter() -> None:
    rec = record("x")
    RequestIdFilter().filter(rec)
    assert vars(rec)["request_id"] is None  # the filter sets it on the record

    def in_request() -> None:
        REQUEST_ID.set("abc123")
        RequestIdFilter().filter(rec)

    copy_context().run(in_request)
    assert vars(rec)["request_id"] == "abc123"
