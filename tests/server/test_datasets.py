"""The import of the published reference tables into a fresh database of each backend (the
session's may hold another test's import): one space only, every measurement as the table holds
it, idempotent, and a clear error for a space without tables."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from predictor.datasets import read_latencies
from predictor.spaces import get_space
from server.cli.local import temporary_postgres_database
from server.db import make_engine, make_session_factory, session_scope, upgrade
from server.errors import Invalid
from server.models import Architecture, Measurement, SearchSpaceRow
from server.services.datasets import IMPORTED, import_datasets
from tests.helpers import DATASETS, POSTGRES_ADMIN_URL

pytestmark = pytest.mark.slow


@pytest.fixture
def fresh_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    if database_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'import.db'}"
        upgrade(url)
        yield url
        return
    with temporary_postgres_database(POSTGRES_ADMIN_URL, "latfarm_import") as url:
        yield url


def test_one_space_is_imported_as_its_table_holds_it_and_only_once(fresh_url: str) -> None:
    table = [(device, ms) for _, device, ms in read_latencies(DATASETS, get_space("nb201"))]
    engine = make_engine(fresh_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            report = import_datasets(session, DATASETS, ("nb201",))
            assert report.per_space == {"nb201": len(table)} and report.measurements_inserted == len(table)
            imported = (select(Measurement.latency_ms, Measurement.valid)
                        .join(Architecture, Architecture.id == Measurement.architecture_id)
                        .join(SearchSpaceRow, SearchSpaceRow.id == Architecture.space_id))
            rows = session.execute(imported.where(SearchSpaceRow.name == "nb201", Measurement.source == IMPORTED)).all()
            assert sorted(ms for ms, _ in rows) == sorted(ms for _, ms in table)
            assert all(valid for _, valid in rows)  # the column's server default, which the bulk paths rely on
            assert session.scalar(select(func.count()).select_from(imported.where(SearchSpaceRow.name != "nb201")
                                                                   .subquery())) == 0
            again = import_datasets(session, DATASETS, ("nb201",))
            assert again.measurements_inserted == 0 and again.devices_skipped == len({d for d, _ in table})
            with pytest.raises(Invalid, match="onnx, nope: no reference tables; choose from"):
                import_datasets(session, DATASETS, ("onnx", "nope"))
    finally:
        engine.dispose()
