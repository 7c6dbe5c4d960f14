"""Predictor registry and pre-training."""

from __future__ import annotations

from fastapi import APIRouter, Query, status
from sqlalchemy import select

from server.api.deps import Db
from server.api.pagination import Cursor, page
from server.auth import ADMIN, READ
from server.errors import NotFound
from server.models import Predictor
from server.schemas import Page, PredictorOut, PretrainIn, RowId, TaskOut
from server.services import training_queue
from server.services.catalog import resolve_space, space_row
from server.services.predictors import NO_CHECKPOINT

router = APIRouter(prefix="/api/v1/predictors", tags=["predictors"])


def predictor_out(row: Predictor) -> PredictorOut:
    return PredictorOut(id=row.id, space=row.space.name, kind=row.kind, version=row.version, parent_id=row.parent_id,
                        device=row.device.name if row.device else None, status=row.status,
                        training_devices=row.training_devices, metrics=row.metrics, data_snapshot=row.data_snapshot,
                        created_at=row.created_at)


@router.get("", dependencies=[READ])
def list_predictors(session: Db, space: str | None = None, cursor: Cursor = 0,
                    limit: int = Query(100, ge=1, le=1000)) -> Page[PredictorOut]:
    query = select(Predictor).options(NO_CHECKPOINT)
    if space is not None:
        query = query.where(Predictor.space_id == space_row(session, resolve_space(space)).id)
    return page(session, query, Predictor.id, cursor, limit, predictor_out)


@router.get("/{predictor_id}", dependencies=[READ])
def read_predictor(predictor_id: RowId, session: Db) -> PredictorOut:
    row = session.get(Predictor, predictor_id, options=[NO_CHECKPOINT])
    if row is None:
        raise NotFound(f"no predictor {predictor_id}", "predictor_id")
    return predictor_out(row)


@router.post("/pretrain", status_code=status.HTTP_202_ACCEPTED, dependencies=[ADMIN])
def pretrain(body: PretrainIn, session: Db) -> TaskOut:
    """Queue the pre-training of a base predictor on the imported reference devices of a space;
    follow it at `GET /api/v1/tasks/{id}` (its `predictor_id` once done)."""
    space_id = space_row(session, resolve_space(body.space)).id
    task = training_queue.enqueue_pretrain(session, space_id, body.devices, body.seed, body.archs_per_space)
    return TaskOut.model_validate(task)
