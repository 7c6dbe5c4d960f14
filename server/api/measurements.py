"""Latency measurements: query (JSON pages or CSV) and bulk import."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Literal

from fastapi import APIRouter, Query, status
from fastapi.responses import StreamingResponse
from sqlalchemy import Select, insert, select
from sqlalchemy.orm import Session, sessionmaker

from server.api.deps import Db, ServicesDep
from server.auth import ADMIN, READ
from server.errors import Invalid
from server.models import Architecture, Device, Measurement, SearchSpaceRow
from server.schemas import INT_MAX, ImportSummary, MeasurementImport, MeasurementOut, Page
from server.services.catalog import canonical_key, ensure_architectures, get_device, resolve_space, space_row

router = APIRouter(prefix="/api/v1/measurements", tags=["measurements"])
CSV_COLUMNS = ("id", "device", "space", "architecture", "latency_ms", "source", "artifact_sha256", "job_id")


def _query(session: Session, device: str | None, space: str | None, architecture: str | None) -> Select:
    query = (
        select(Measurement, Device.name, SearchSpaceRow.name, Architecture.key)
        .join(Device, Device.id == Measurement.device_id)
        .outerjoin(Architecture, Architecture.id == Measurement.architecture_id)
        .outerjoin(SearchSpaceRow, SearchSpaceRow.id == Architecture.space_id)
        .order_by(Measurement.id)
    )
    if device is not None:
        query = query.where(Measurement.device_id == get_device(session, device).id)
    if space is not None:
        resolved = resolve_space(space)
        query = query.where(Architecture.space_id == space_row(session, resolved).id)
        if architecture is not None:
            query = query.where(Architecture.key == canonical_key(resolved, architecture))
    elif architecture is not None:
        raise Invalid("filtering by architecture needs `space`", "space")
    return query


def _out(measurement: Measurement, device: str, space: str | None, key: str | None) -> MeasurementOut:
    return MeasurementOut(
        id=measurement.id, device=device, space=space, architecture=key, artifact_sha256=measurement.artifact_sha256,
        latency_ms=measurement.latency_ms, source=measurement.source, stats=measurement.stats, flags=measurement.flags,
        valid=measurement.valid, provenance=measurement.provenance, job_id=measurement.job_id,
        created_at=measurement.created_at,
    )


@router.get("", response_model=Page[MeasurementOut], responses={200: {"content": {"text/csv": {}}}},
            dependencies=[READ])
def list_measurements(
    session: Db,
    services: ServicesDep,
    device: str | None = None,
    space: str | None = None,
    architecture: str | None = Query(None, description="canonical key; needs `space`"),
    cursor: int = Query(0, ge=0, le=INT_MAX, description="id after which the page starts"),
    limit: int = Query(1000, ge=1, le=50_000),
    format: Literal["json", "csv"] = "json",
) -> Page[MeasurementOut] | StreamingResponse:
    query = _query(session, device, space, architecture)
    if format == "csv":
        return StreamingResponse(_csv(services.sessions, query), media_type="text/csv")
    rows = session.execute(query.where(Measurement.id > cursor).limit(limit)).all()
    items = [_out(*row) for row in rows]
    return Page(items=items, next_cursor=items[-1].id if len(items) == limit else None)


def _csv(sessions: sessionmaker[Session], query: Select) -> Iterator[str]:
    """Rows streamed from a session of their own: the request's is closed once streaming starts."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    with sessions() as session:
        for m, device, space, key in session.execute(query.execution_options(yield_per=10_000)):
            writer.writerow((m.id, device, space, key, m.latency_ms, m.source, m.artifact_sha256 or "", m.job_id or ""))
            if buffer.tell() > 1 << 16:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
    yield buffer.getvalue()


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[ADMIN])
def import_measurements(body: MeasurementImport, session: Db) -> ImportSummary:
    """Bulk import of latencies measured elsewhere, e.g. a published table or another farm."""
    space = resolve_space(body.space)
    device = get_device(session, body.device)
    keys = [canonical_key(space, row.architecture, f"rows.{i}.architecture") for i, row in enumerate(body.rows)]
    known, created = ensure_architectures(session, space, keys)
    session.execute(
        insert(Measurement),
        [{"device_id": device.id, "architecture_id": known[key], "latency_ms": row.latency_ms, "source": "imported"}
         for key, row in zip(keys, body.rows)],
    )
    return ImportSummary(device=device.name, space=space.name, inserted=len(keys), architectures_created=created)
