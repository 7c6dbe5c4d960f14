"""Predictor registry: pre-train, adapt, pick the predictor for a device, cache loaded models."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from predictor import LatencyPredictor
from predictor.spaces import SearchSpace
from server.errors import Conflict, Invalid, NotFound
from server.models import Device, Predictor, PredictorKind
from server.schemas import PredictIn, PredictOut
from server.services.catalog import canonical_key, get_device, resolve_space, space_row
from server.services.datasets import iter_reference_rows

MAX_BATCH = 100_000


class PredictorCache:
    """Loaded predictors by id: deserialising a checkpoint costs more than a whole-space predict."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._items: OrderedDict[int, LatencyPredictor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, row: Predictor) -> LatencyPredictor:
        with self._lock:
            if row.id in self._items:
                self._items.move_to_end(row.id)
                return self._items[row.id]
        model = LatencyPredictor.load(row.checkpoint)
        with self._lock:
            self._items[row.id] = model
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return model


def _next_version(session: Session, space_id: int, device_id: int | None) -> int:
    latest = session.scalar(
        # `== None` renders as IS NULL: base predictors have no device
        select(func.max(Predictor.version)).where(Predictor.space_id == space_id, Predictor.device_id == device_id)
    )
    return (latest or 0) + 1


def pretrain(
    session: Session, space: SearchSpace, devices: list[str] | None = None, seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Predictor:
    """A base predictor from the imported reference measurements of `space`."""
    rows = list(iter_reference_rows(session, space, devices))
    if not rows:
        raise Conflict(f"no reference measurements for space {space.name!r}: run `latfarm datasets import` first",
                       "space")
    found = sorted({device for _, device, _ in rows})
    if devices is not None and (missing := sorted(set(devices) - set(found))):
        raise Invalid(f"no reference measurements of {space.name} on: {', '.join(missing)}", "devices")
    started = time.perf_counter()
    model = LatencyPredictor.pretrain(space, rows, seed=seed, progress=progress)
    row = Predictor(
        space_id=space_row(session, space).id,
        kind=PredictorKind.base,
        version=_next_version(session, space_row(session, space).id, None),
        training_devices=found,
        metrics={"train_seconds": round(time.perf_counter() - started, 2), "rows": len(rows),
                 "architectures": len({key for key, _, _ in rows})},
        checkpoint=model.to_bytes(),
    )
    session.add(row)
    session.flush()
    return row


def adapt(session: Session, cache: PredictorCache, base: Predictor, device: Device,
          samples: dict[str, float], seed: int = 0) -> Predictor:
    started = time.perf_counter()
    model = cache.get(base).adapt(samples, name=device.name, seed=seed)
    assert model.target is not None
    row = Predictor(
        space_id=base.space_id,
        kind=PredictorKind.adapted,
        version=_next_version(session, base.space_id, device.id),
        parent_id=base.id,
        device_id=device.id,
        training_devices=base.training_devices,
        metrics={"adapt_seconds": round(time.perf_counter() - started, 3), "samples": len(samples),
                 # per block; null: the block was left out (JSON has no infinity)
                 "ridge_penalties": [p if math.isfinite(p) else None for p in model.target.penalties]},
        checkpoint=model.to_bytes(),
    )
    session.add(row)
    session.flush()
    return row


def latest_base(session: Session, space: SearchSpace) -> Predictor | None:
    return session.scalar(
        select(Predictor)
        .where(Predictor.space_id == space_row(session, space).id, Predictor.kind == PredictorKind.base)
        .order_by(Predictor.created_at.desc(), Predictor.id.desc())
        .limit(1)
    )


def predictor_for(session: Session, space: SearchSpace, device: Device, predictor_id: int | None) -> Predictor:
    """The named predictor, else the newest adapted one of the device, else a base trained on it."""
    space_id = space_row(session, space).id
    if predictor_id is not None:
        row = session.get(Predictor, predictor_id)
        if row is None:
            raise NotFound(f"no predictor {predictor_id}", "predictor_id")
        if row.space_id != space_id:
            raise Invalid(f"predictor {predictor_id} is for space {row.space.name!r}, not {space.name!r}", "predictor_id")
        serves = row.device_id == device.id if row.kind is PredictorKind.adapted else device.name in row.training_devices
        if not serves:
            raise Invalid(f"predictor {predictor_id} does not serve device {device.name!r}", "predictor_id")
        return row
    adapted = session.scalar(
        select(Predictor)
        .where(Predictor.space_id == space_id, Predictor.device_id == device.id)
        .order_by(Predictor.id.desc())
        .limit(1)
    )
    if adapted is not None:
        return adapted
    for base in session.scalars(
        select(Predictor)
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


def predict_batch(session: Session, cache: PredictorCache, request: PredictIn) -> PredictOut:
    space = resolve_space(request.space)
    device = get_device(session, request.device)
    row = predictor_for(session, space, device, request.predictor_id)
    if request.architectures == "all":
        try:
            keys = list(space.enumerate())
        except NotImplementedError as exc:
            raise Invalid(f"{exc}; list the architectures instead", "architectures") from exc
    else:
        keys = [canonical_key(space, key, f"architectures.{i}") for i, key in enumerate(request.architectures)]
    if len(keys) > MAX_BATCH:
        raise Invalid(f"at most {MAX_BATCH} architectures per call", "architectures")
    ms, std = cache.get(row).predict(keys, device=device.name)
    return PredictOut(device=device.name, space=space.name, predictor_id=row.id, predictor_version=row.version,
                      predictor_kind=row.kind, architectures=keys, latency_ms=ms.tolist(), uncertainty_ms=std.tolist())
