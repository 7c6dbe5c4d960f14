"""The in-process tier: the application called through its ASGI interface (FastAPI's test client,
httpx underneath), each test inside one database transaction that is rolled back after it, on
SQLite and on Postgres. No port, no server process, no lifespan: the reaper, the training worker
and the wake-ups do not run here (the live tier, tests/live/, covers them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine, event
from sqlalchemy.orm import sessionmaker

from server.app import create_app
from server.db import make_engine
from server.settings import Settings
from tests.helpers import ADMIN_TOKEN


@pytest.fixture(scope="session")
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.database_url)
    if engine.dialect.name == "sqlite":
        # pysqlite begins transactions itself and breaks SAVEPOINT: let SQLAlchemy say BEGIN
        event.listen(engine, "connect", lambda dbapi, _: setattr(dbapi, "isolation_level", None))
        event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN"))
    yield engine
    engine.dispose()


@pytest.fixture
def connection(app: FastAPI, engine: Engine) -> Iterator[Connection]:
    """The test's transaction: every request's session joins it (their commits release
    savepoints), and it is rolled back once the test ends."""
    services = app.state.services
    served_by = services.sessions
    with engine.connect() as connection:
        transaction = connection.begin()
        services.sessions = sessionmaker(bind=connection, expire_on_commit=False,
                                         join_transaction_mode="create_savepoint")
        try:
            yield connection
        finally:
            services.sessions = served_by
            transaction.rollback()


@pytest.fixture
def root(app: FastAPI, connection: Connection) -> Iterator[TestClient]:
    """No token, at the server's root (/healthz, /docs, /metrics)."""
    yield from _client(app, "")


@pytest.fixture
def api(app: FastAPI, connection: Connection) -> Iterator[TestClient]:
    """The admin token, at /api/v1."""
    yield from _client(app, "/api/v1", {"Authorization": f"Bearer {ADMIN_TOKEN}"})


@pytest.fixture
def anonymous(app: FastAPI, connection: Connection) -> Iterator[TestClient]:
    yield from _client(app, "/api/v1")


def _client(app: FastAPI, prefix: str, headers: dict[str, str] | None = None) -> Iterator[TestClient]:
    # not entered as a context manager: that would run the lifespan (reaper, worker, wake-ups);
    # a server error is an answer to check (500), not an exception raised into the test
    client = TestClient(app, base_url=f"http://testserver{prefix}", headers=headers, raise_server_exceptions=False)
    yield client
    client.close()
