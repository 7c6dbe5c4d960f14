"""Shared fixtures: a real database per backend (SQLite file, fresh Postgres database) and a real
uvicorn server on a free port in front of it."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest

from server.cli.local import running_server, temporary_postgres_database, worker_process
from server.db import upgrade
from server.settings import Settings
from tests.helpers import ADMIN_TOKEN, DATASETS, POSTGRES_ADMIN_URL


class _ServerErrors(logging.Handler):
    """What the servers in this process (the in-process app, `running_server`'s uvicorn) log when
    they answer 500: the app's last-resort handler and uvicorn's own."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


_SERVER_ERRORS = _ServerErrors()
for _name in ("server.errors", "uvicorn.error"):
    logging.getLogger(_name).addHandler(_SERVER_ERRORS)


@pytest.fixture(autouse=True)
def no_server_answers_500() -> Iterator[None]:
    """Every test: no request to a server in this process was answered 500 meanwhile (server
    processes are checked by the tests that start them)."""
    seen = len(_SERVER_ERRORS.messages)
    yield
    assert _SERVER_ERRORS.messages[seen:] == [], "a server answered 500"


BACKENDS = ("sqlite", "postgres")
#: a live flow runs once, on the production backend: the in-process tier holds the API's behaviour
#: on both, and the live modules whose subject is the backend (dispatch, hostile input) start a
#: server per backend of their own, as do those that need a farm of their own (on SQLite)
LIVE_BACKENDS = ("postgres",)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that uses `database_url` runs once per backend of its tier."""
    if "database_url" in metafunc.fixturenames:
        backends = LIVE_BACKENDS if "live" in metafunc.definition.path.parts else BACKENDS
        metafunc.parametrize("database_url", backends, indirect=True, scope="session")


@pytest.fixture(scope="session")
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated, empty database; Postgres gets a database of its own, dropped afterwards."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'latfarm.db'}"
        upgrade(url)
        yield url
        return
    with temporary_postgres_database(POSTGRES_ADMIN_URL, "latfarm_test") as url:
        yield url


@pytest.fixture(scope="session")
def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        database_url=database_url,
        datasets=DATASETS,
        artifact_dir=tmp_path_factory.mktemp("artifacts"),
        admin_token=ADMIN_TOKEN,
        max_body_bytes=2 * 1024 * 1024,
        poll_wait_s=2.0,
        heartbeat_s=1.0,
        readapt_delay_s=1.0,
        # SQLite: the server's own training worker; Postgres: a separate `latfarm worker` process
        worker=database_url.startswith("sqlite"),
    )


@pytest.fixture(scope="session")
def server_url(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(settings) as url:
        if settings.worker:
            yield url
            return
        log = tmp_path_factory.mktemp("worker") / "worker.log"
        # the worker reads uploaded models from the server's artifact store
        with worker_process({"LATFARM_DATABASE_URL": settings.database_url,
                             "LATFARM_ARTIFACT_DIR": str(settings.artifact_dir)}, log):
            yield url


@pytest.fixture
def api(server_url: str) -> Iterator[httpx.Client]:
    """A client holding the admin token."""
    with httpx.Client(base_url=f"{server_url}/api/v1", timeout=120,
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        yield client


@pytest.fixture
def anonymous(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{server_url}/api/v1", timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def imported(settings: Settings) -> Settings:
    """The database with the full reference datasets imported (once per backend)."""
    if not (DATASETS / "devices.csv").is_file():
        pytest.skip("reference datasets not found")
    from server.services.runtime import import_reference_datasets

    import_reference_datasets(settings, DATASETS)
    return settings


