"""Migrations round-trip (upgrade -> downgrade -> upgrade) and leave the schema the models declare,
on SQLite and on Postgres."""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from server.cli.local import temporary_postgres_database
from server.db import alembic_config, make_engine, upgrade
from server.models import Base
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


def _round_trip(url: str) -> None:
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


def test_migrations_round_trip_on_sqlite(tmp_path: Any) -> None:
    _round_trip(f"sqlite:///{tmp_path / 'round-trip.db'}")


def test_migrations_round_trip_on_postgres() -> None:
    with temporary_postgres_database(POSTGRES_ADMIN_URL, "latfarm_migrations") as url:
        command.downgrade(alembic_config(url), "base")  # the helper hands it over migrated
        _round_trip(url)
