"""Predictor registry: pre-train and adapt predictors, store them as versions, pick the one that
serves a device."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer, sessionmaker

from predictor import LatencyPredictor, TrainConfig
from predictor.reference import Row
from predictor.spaces import SearchSpace, get_space
from server.db import session_scope
from server.errors import Conflict, Invalid, NotFound
from server.models import Architecture, Device, Measurement, Predictor, PredictorKind, PredictorStatus, as_utc
from server.services import scoring
from server.services.answer_cache import PredictorCache
from server.services.catalog import space_row
from server.services.datasets import IMPORTED, iter_reference_rows
from server.settings import Settings

#: picking a predictor reads its row, not its checkpoint (megabytes; loaded once into the cache)
NO_CHECKPOINT = defer(Predictor.checkpoint)
#: newest first: the order in which a space's base predictor (the one onboarding starts from) is picked
LATEST_FIRST = (Predictor.created_at.desc(), Predictor.id.desc())


@dataclass(frozen=True)
class Sample:
    """One measured architecture of a device, as adaptation uses it."""

    key: str
    ms: float
    measured_at: datetime


def _next_version(session: Session, space_id: int, device_id: int | None) -> int:
    latest = session.scalar(
        # `== None` renders as IS NULL: base predictors have no device
        select(func.max(Predictor.version)).where(Predictor.space_id == space_id, Predictor.device_id == device_id)
    )
    return (latest or 0) + 1


#: the rows a space's base predictor pre-trains on, when they are not its own imported measurements
RowSource = Callable[[Session], list[Row]]


def reference_rows(session: Session, space: SearchSpace, devices: list[str] | None,
                   source: RowSource | None = None) -> list[Row]:
    """The imported reference measurements to pre-train on (or `source`'s rows); every named
    device must have some."""
    rows = source(session) if source is not None else list(iter_reference_rows(session, space, devices))
    if not rows:
        raise Conflict(f"no reference measurements for space {space.name!r}: run `latfarm datasets import` first",
                       "space")
    if devices is not None and (missing := sorted(set(devices) - {device for _, device, _ in rows})):
        raise Invalid(f"no reference measurements of {space.name} on: {', '.join(missing)}", "devices")
    return rows


def train_config(settings: Settings) -> TrainConfig:
    """How this server pre-trains."""
    return TrainConfig(sampler_folds=settings.pretrain_sampler_folds)


def pretrain(sessions: sessionmaker[Session], space: SearchSpace, devices: list[str] | None = None, seed: int = 0,
             progress: Callable[[int, int], None] | None = None, source: RowSource | None = None,
             *, config: TrainConfig) -> Predictor:
    """A base predictor from the imported reference measurements of `space` (or `source`'s rows);
    no transaction is held open while it trains. A graph-encoded space other than `onnx` learns
    in the `onnx` space, where `source`'s rows (the reference spaces' exports) are keyed."""
    with session_scope(sessions) as session:
        rows = reference_rows(session, space, devices, source)
        found = sorted({device for _, device, _ in rows})
        snapshot = _snapshot(session, space, found)
    started = time.perf_counter()
    learns_in = get_space("onnx") if space.graph_encoded else space
    model = LatencyPredictor.pretrain(learns_in, rows, seed=seed, config=config, progress=progress)
    if learns_in is not space:
        model = model.serving(space)
    metrics = {"train_seconds": round(time.perf_counter() - started, 2), "rows": len(rows),
               "architectures": len({key for key, _, _ in rows}), "seed": seed}
    with session_scope(sessions) as session:
        space_id = space_row(session, space).id
        row = Predictor(space_id=space_id, kind=PredictorKind.base, version=_next_version(session, space_id, None),
                        training_devices=found, metrics=metrics, data_snapshot=snapshot, checkpoint=model.to_bytes())
        session.add(row)
        session.flush()
        return row


def _snapshot(session: Session, space: SearchSpace, devices: list[str]) -> dict[str, Any]:
    count, first, last = session.execute(
        select(func.count(), func.min(Measurement.created_at), func.max(Measurement.created_at))
        .join(Architecture, Architecture.id == Measurement.architecture_id)
        .join(Device, Device.id == Measurement.device_id)
        .where(Architecture.space_id == space_row(session, space).id, Measurement.source == IMPORTED,
               Device.name.in_(devices))
    ).one()
    return {"measurements": count, "devices": len(devices), **_time_range(first, last)}


def _time_range(first: datetime | None, last: datetime | None) -> dict[str, str | None]:
    return {"first_measured_at": _iso(first), "last_measured_at": _iso(last)}


def _iso(moment: datetime | None) -> str | None:
    return as_utc(moment).isoformat() if moment is not None else None


def adapt(session: Session, cache: PredictorCache, base: Predictor, device: Device, samples: Sequence[Sample],
          validation: Mapping[str, float], seed: int = 0) -> Predictor:
    """An adapted predictor for `device` from its measured `samples` (in the order they were
    chosen), scored on the `validation` measurements (other architectures of the device)."""
    started = time.perf_counter()
    base_model = cache.get(base)
    latencies = {sample.key: sample.ms for sample in samples}
    model = base_model.adapt(latencies, name=device.name)
    assert model.target is not None
    metrics: dict[str, Any] = {
        "adapt_seconds": round(time.perf_counter() - started, 3), "samples": len(latencies),
        # prior variances of the reference and descriptor blocks (0: left out) and the noise
        # variance, chosen by marginal likelihood
        "prior_scales": list(model.target.scales),
        **scoring.validate(base_model, model, latencies, validation, seed),
    }
    times = [sample.measured_at for sample in samples]
    row = Predictor(
        space_id=base.space_id,
        kind=PredictorKind.adapted,
        version=_next_version(session, base.space_id, device.id),
        parent_id=base.id,
        device_id=device.id,
        training_devices=base.training_devices,
        metrics=metrics,
        data_snapshot={"measurements": len(latencies), "validation_measurements": len(validation),
                       **_time_range(min(times), max(times))},
        checkpoint=model.to_bytes(),
    )
    session.add(row)
    session.flush()
    return row


def latest_base(session: Session, space: SearchSpace) -> Predictor | None:
    return session.scalar(
        select(Predictor)
        .where(Predictor.space_id == space_row(session, space).id, Predictor.kind == PredictorKind.base)
        .order_by(*LATEST_FIRST)
        .limit(1)
    )


def predictor_for(session: Session, space: SearchSpace, device: Device, predictor_id: int | None) -> Predictor:
    """The named predictor, else the device's newest ready adapted one (its newest stale one when
    none is ready: an answer flagged stale beats none), else a base trained on it."""
    space_id = space_row(session, space).id
    if predictor_id is not None:
        row = session.get(Predictor, predictor_id, options=[NO_CHECKPOINT])
        if row is None:
            raise NotFound(f"no predictor {predictor_id}", "predictor_id")
        if row.space_id != space_id:
            raise Invalid(f"predictor {predictor_id} is for space {row.space.name!r}, not {space.name!r}",
                          "predictor_id")
        if row.kind is PredictorKind.adapted:
            serves = row.device_id == device.id
        else:
            serves = device.name in row.training_devices
        if not serves:
            raise Invalid(f"predictor {predictor_id} does not serve device {device.name!r}", "predictor_id")
        return row
    adapted = session.scalar(
        select(Predictor)
        .options(NO_CHECKPOINT)
        .where(Predictor.space_id == space_id, Predictor.device_id == device.id)
        .order_by(Predictor.status == PredictorStatus.stale, Predictor.id.desc())
        .limit(1)
    )
    if adapted is not None:
        return adapted
    for base in session.scalars(
        select(Predictor)
        .options(NO_CHECKPOINT)
        .where(Predictor.space_id == space_id, Predictor.kind == PredictorKind.base)
        .order_by(Predictor.id.desc())
    ):
        if device.name in base.training_devices:
            return base
    raise Conflict(
        f"no predictor serves device {device.name!r} in space {space.name!r}: onboard the device "
        f"(POST /api/v1/devices/{device.name}/onboard) or pre-train on it",
        "device",
    )
