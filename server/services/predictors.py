"""Predictor registry: pre-train, adapt, pick the predictor for a device, cache loaded models."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer

from predictor import LatencyPredictor
from predictor.spaces import SearchSpace
from server.errors import Conflict, Invalid, NotFound
from server.models import Device, Predictor, PredictorKind
from server.schemas import PredictIn, PredictOut
from server.services.catalog import canonical_key, get_device, resolve_space, space_row
from server.services.datasets import iter_reference_rows

MAX_BATCH = 100_000
#: picking a predictor reads its row, not its checkpoint (megabytes; loaded once into the cache)
_NO_CHECKPOINT = defer(Predictor.checkpoint)


class PredictorCache:
    """Loaded predictors by id (deserialising a checkpoint costs more than a whole-space predict),
    and their answers: a predictor is frozen once stored, so what it said of an architecture on a
    device stays true, and NAS clients ask about the same architectures again and again."""

    def __init__(self, capacity: int = 16, answers_per_device: int = 200_000) -> None:
        self.capacity = capacity
        self.answers_per_device = answers_per_device
        self._items: OrderedDict[int, LatencyPredictor] = OrderedDict()
        #: (predictor id, device) -> {architecture key: (ms, uncertainty ms)}
        self._answers: OrderedDict[tuple[int, str], dict[str, tuple[float, float]]] = OrderedDict()
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

    def predict(self, row: Predictor, device: str, keys: list[str]) -> tuple[list[float], list[float]]:
        """Latency and uncertainty (ms) of each key on `device`; only unseen keys reach the model."""
        answers = self._answers_of(row.id, device)
        unseen = [key for key in dict.fromkeys(keys) if key not in answers]
        fresh: dict[str, tuple[float, float]] = {}
        if unseen:
            ms, std = self.get(row).predict(unseen, device=device)
            fresh = dict(zip(unseen, zip(ms.tolist(), std.tolist())))
            self._remember(row.id, device, answers, fresh)
        pairs = [fresh[key] if key in fresh else answers[key] for key in keys]
        return [ms for ms, _ in pairs], [std for _, std in pairs]

    def _answers_of(self, predictor_id: int, device: str) -> dict[str, tuple[float, float]]:
        with self._lock:
            answers = self._answers.setdefault((predictor_id, device), {})
            self._answers.move_to_end((predictor_id, device))
            while len(self._answers) > self.capacity * 4:
                self._answers.popitem(last=False)
            return answers

    def _remember(self, predictor_id: int, device: str, answers: dict[str, tuple[float, float]],
                  fresh: dict[str, tuple[float, float]]) -> None:
        """Add `fresh` to `answers`, or start over from it when that would pass the cap (a new dict:
        concurrent readers keep the one they hold)."""
        if len(answers) + len(fresh) <= self.answers_per_device:
            answers.update(fresh)
            return
        with self._lock:
            self._answers[(predictor_id, device)] = dict(fresh)


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
        row = session.get(Predictor, predictor_id, options=[_NO_CHECKPOINT])
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
        .options(_NO_CHECKPOINT)
        .where(Predictor.space_id == space_id, Predictor.device_id == device.id)
        .order_by(Predictor.id.desc())
        .limit(1)
    )
    if adapted is not None:
        return adapted
    for base in session.scalars(
        select(Predictor)
        .options(_NO_CHECKPOINT)
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
    ms, std = cache.predict(row, device.name, keys)
    return PredictOut(device=device.name, space=space.name, predictor_id=row.id, predictor_version=row.version,
                      predictor_kind=row.kind, architectures=keys, latency_ms=ms, uncertainty_ms=std)
