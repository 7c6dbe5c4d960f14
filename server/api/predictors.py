"""Predictor registry and pre-training."""

from __future__ import annotations

from fastapi import APIRouter, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.api.deps import Db
from server.auth import ADMIN, READ
from server.models import Device, Predictor
from server.schemas import PredictorOut, PretrainIn
from server.services import predictors as predictor_service
from server.services.catalog import resolve_space, space_row

router = APIRouter(prefix="/api/v1/predictors", tags=["predictors"])


def predictor_out(session: Session, row: Predictor) -> PredictorOut:
    device = session.get(Device, row.device_id) if row.device_id is not None else None
    return PredictorOut(id=row.id, space=row.space.name, kind=row.kind, version=row.version, parent_id=row.parent_id,
                        device=device.name if device else None, training_devices=row.training_devices,
                        metrics=row.metrics, created_at=row.created_at)


@router.get("", dependencies=[READ])
def list_predictors(session: Db, space: str | None = None) -> list[PredictorOut]:
    query = select(Predictor).order_by(Predictor.id)
    if space is not None:
        query = query.where(Predictor.space_id == space_row(session, resolve_space(space)).id)
    return [predictor_out(session, row) for row in session.scalars(query)]


@router.post("/pretrain", status_code=status.HTTP_201_CREATED, dependencies=[ADMIN])
def pretrain(body: PretrainIn, session: Db) -> PredictorOut:
    """Pre-train a base predictor on the imported reference devices of a space (blocks until done)."""
    row = predictor_service.pretrain(session, resolve_space(body.space), body.devices, body.seed)
    return predictor_out(session, row)
