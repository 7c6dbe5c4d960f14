"""Migrations round-trip (upgrade -> downgrade -> upgrade) and leave the schema the models declare,
on SQLite and on Postgres."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from server.cli.local import temporary_postgres_database
from server.db import alembic_config, make_engine, upgrade
from server.models import Base, Device, Measurement
from tests.helpers import POSTGRES_ADMIN_URL


def _differences(url: str) -> list[Any]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            found = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                     Base.metadata)
            sqlite = connection.dialect.name == "sqlite"
    finally:
        engine.dispose()
    # SQLite's reflection drops an index column's DESC, so the queue index reads as changed there
    # (Postgres, which keeps it, compares equal)
    return [diff for diff in found if not (sqlite and _is_queue_index(diff))]


def _is_queue_index(diff: Any) -> bool:
    return isinstance(diff, tuple) and diff[0] in ("add_index", "remove_index") and diff[1].name == "ix_jobs_queue"


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """The URL of a database with no revision applied, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
        return
    with temporary_postgres_database(POSTGRES_ADMIN_URL, "latfarm_migrations") as url:
        command.downgrade(alembic_config(url), "base")  # the helper hands it over migrated
        yield url


def test_migrations_round_trip(empty_database: str) -> None:
    url = empty_database
    config = alembic_config(url)
    upgrade(url)
    assert _differences(url) == []
    command.downgrade(config, "base")
    engine = make_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    upgrade(url)
    assert _differences(url) == []


def test_short_measurements_stored_before_become_valid(empty_database: str) -> None:
    """Migration 0007 on measurements stored before it: `short` alone, with the preset's minimum
    runs, becomes valid; the downgrade restores them."""
    url = empty_database
    config = alembic_config(url)
    command.upgrade(config, "0006_collections")
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            device = Device(name="phone")
            session.add(device)
            session.flush()
            stored = [  # as stored before: every flagged measurement invalid
                (["short"], 5000, "quick"),  # a fast model: the run cap came first
                (["short"], 3, "quick"),  # too few runs
                (["unstable", "short"], 5000, "quick"),
                (["short"], 100, "rigorous"),  # under the rigorous preset's 200 runs
            ]
            session.add_all(Measurement(device_id=device.id, latency_ms=0.02, flags=flags, stats={"n": n},
                                        preset=preset, valid=False) for flags, n, preset in stored)
            session.commit()

        def valid() -> list[bool]:
            with Session(engine) as session:
                return list(session.scalars(select(Measurement.valid).order_by(Measurement.id)))

        command.upgrade(config, "head")
        assert valid() == [True, False, False, False]
        command.downgrade(config, "0006_collections")
        assert valid() == [False, False, False, False]
    finally:
        engine.dispose()

