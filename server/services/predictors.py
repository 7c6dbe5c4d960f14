"""Predictor registry: pre-train, adapt, pick the predictor for a device, cache loaded models."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer, sessionmaker

import torch

from predictor import LatencyPredictor
from predictor.explain import explain
from predictor.reference import Row
from predictor.spaces import SearchSpace
from server.db import session_scope
from server.errors import Conflict, Invalid, NotFound
from server.models import Architecture, Device, Measurement, Predictor, PredictorKind, PredictorStatus, as_utc
from server.schemas import ExplainOut, PredictIn, PredictOut
from server.services import scoring
from server.services.catalog import canonical_key, get_device, resolve_space, space_row
from server.services.datasets import IMPORTED, iter_reference_rows

MAX_BATCH = 100_000
#: picking a predictor reads its row, not its checkpoint (megabytes; loaded once into the cache)
NO_CHECKPOINT = defer(Predictor.checkpoint)
#: seconds the predictor picked for a (space, device) is reused without asking the database: a
#: new predictor of the device is served this long after it is stored at the latest
PICK_TTL_S = 1.0


@dataclass(frozen=True)
class Pick:
    """The predictor that answers for a device: what a /predict answer says of it."""

    predictor_id: int
    version: int
    kind: PredictorKind
    status: PredictorStatus
    device: str


@dataclass(frozen=True)
class Sample:
    """One measured architecture of a device, as adaptation uses it."""

    key: str
    ms: float
    measured_at: datetime


class PredictorCache:
    """Loaded predictors by id (deserialising a checkpoint costs more than a whole-space predict),
    and their answers: a predictor is frozen once stored, so what it said of an architecture on a
    device stays true, and NAS clients ask about the same architectures again and again."""

    def __init__(self, capacity: int = 16, answers_per_device: int = 200_000, torch_threads: int = 1) -> None:
        self.capacity = capacity
        self.answers_per_device = answers_per_device
        self.torch_threads = torch_threads
        self._pinned = threading.local()
        self._items: OrderedDict[int, LatencyPredictor] = OrderedDict()
        #: (predictor id, device) -> {architecture key: (ms, uncertainty ms)}
        self._answers: OrderedDict[tuple[int, str], dict[str, tuple[float, float]]] = OrderedDict()
        #: (space, device, named predictor id) -> (monotonic expiry, pick)
        self._picks: dict[tuple[str, str, int | None], tuple[float, Pick]] = {}
        self._lock = threading.Lock()

    def get(self, row: Predictor) -> LatencyPredictor:
        return self.model(row.id, lambda: row.checkpoint)

    def model(self, predictor_id: int, checkpoint: Callable[[], bytes]) -> LatencyPredictor:
        """The loaded predictor; `checkpoint` is read only when it is not in memory yet."""
        with self._lock:
            if predictor_id in self._items:
                self._items.move_to_end(predictor_id)
                return self._items[predictor_id]
        model = LatencyPredictor.load(checkpoint())
        with self._lock:
            self._items[predictor_id] = model
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return model

    def predict(self, row: Predictor, device: str, keys: list[str]) -> tuple[list[float], list[float]]:
        """Latency and uncertainty (ms) of each key on `device`; only unseen keys reach the model."""
        return self.answer(row.id, device, keys, lambda: row.checkpoint)

    def answer(self, predictor_id: int, device: str, keys: list[str],
               checkpoint: Callable[[], bytes]) -> tuple[list[float], list[float]]:
        answers = self._answers_of(predictor_id, device)
        unseen = [key for key in dict.fromkeys(keys) if key not in answers]
        fresh: dict[str, tuple[float, float]] = {}
        if unseen:
            self.pin_torch_threads()
            ms, std = self.model(predictor_id, checkpoint).predict(unseen, device=device)
            fresh = dict(zip(unseen, zip(ms.tolist(), std.tolist())))
            self._remember(predictor_id, device, answers, fresh)
        pairs = [fresh[key] if key in fresh else answers[key] for key in keys]
        return [ms for ms, _ in pairs], [std for _, std in pairs]

    def remembered(self, pick: Pick, keys: list[str]) -> tuple[list[float], list[float]] | None:
        """The answers for `keys` if every one is already known, without touching the model."""
        with self._lock:
            answers = self._answers.get((pick.predictor_id, pick.device))
        if answers is None:
            return None
        try:
            pairs = [answers[key] for key in keys]
        except KeyError:
            return None
        return [ms for ms, _ in pairs], [std for _, std in pairs]

    def pick(self, space: str, device: str, predictor_id: int | None) -> Pick | None:
        found = self._picks.get((space, device, predictor_id))
        return found[1] if found is not None and found[0] > time.monotonic() else None

    def remember_pick(self, space: str, device: str, predictor_id: int | None, pick: Pick) -> None:
        if len(self._picks) > self.capacity * 64:  # many devices: forget them all rather than grow
            self._picks = {}
        self._picks[(space, device, predictor_id)] = (time.monotonic() + PICK_TTL_S, pick)

    def pin_torch_threads(self) -> None:
        """Set torch's thread count in the calling thread: OpenMP keeps it per thread, so the count
        set at start-up does not reach request or worker threads. Unpinned, the server's NB201
        pre-training on a busy 2-core host was 91 % done after 10 minutes; pinned, it took 79 s."""
        if getattr(self._pinned, "threads", None) != self.torch_threads:
            torch.set_num_threads(self.torch_threads)
            self._pinned.threads = self.torch_threads

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


def reference_rows(session: Session, space: SearchSpace, devices: list[str] | None) -> list[Row]:
    """The imported reference measurements to pre-train on; every named device must have some."""
    rows = list(iter_reference_rows(session, space, devices))
    if not rows:
        raise Conflict(f"no reference measurements for space {space.name!r}: run `latfarm datasets import` first",
                       "space")
    if devices is not None and (missing := sorted(set(devices) - {device for _, device, _ in rows})):
        raise Invalid(f"no reference measurements of {space.name} on: {', '.join(missing)}", "devices")
    return rows


def pretrain(sessions: sessionmaker[Session], space: SearchSpace, devices: list[str] | None = None, seed: int = 0,
             progress: Callable[[int, int], None] | None = None) -> Predictor:
    """A base predictor from the imported reference measurements of `space`; no transaction is
    held open while it trains."""
    with session_scope(sessions) as session:
        rows = reference_rows(session, space, devices)
        found = sorted({device for _, device, _ in rows})
        snapshot = _snapshot(session, space, found)
    started = time.perf_counter()
    model = LatencyPredictor.pretrain(space, rows, seed=seed, progress=progress)
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
    return {"first_measured_at": first and as_utc(first).isoformat(), "last_measured_at": last and as_utc(last).isoformat()}


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
        .order_by(Predictor.created_at.desc(), Predictor.id.desc())
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
            raise Invalid(f"predictor {predictor_id} is for space {row.space.name!r}, not {space.name!r}", "predictor_id")
        serves = row.device_id == device.id if row.kind is PredictorKind.adapted else device.name in row.training_devices
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


def explanation(session: Session, cache: PredictorCache, device: Device, space: SearchSpace) -> ExplainOut:
    """What the device's newest adapted predictor says of it."""
    row = predictor_for(session, space, device, None)
    if row.kind is not PredictorKind.adapted:
        raise Conflict(f"device {device.name!r} has no adapted predictor in space {space.name!r}: onboard it first",
                       "name")
    found = explain(cache.get(row))
    return ExplainOut(device=device.name, space=space.name, predictor_id=row.id, architectures=found.architectures,
                      resembles=found.resembles, op_costs=found.op_costs)


@dataclass(frozen=True)
class PredictQuery:
    """A /predict request, checked and with canonical keys (every key of the space for "all")."""

    space: SearchSpace
    device: str
    predictor_id: int | None
    keys: list[str]

    @classmethod
    def of(cls, request: PredictIn) -> "PredictQuery":
        space = resolve_space(request.space)
        if request.architectures == "all":
            try:
                keys = list(space.enumerate())
            except NotImplementedError as exc:
                raise Invalid(f"{exc}; list the architectures instead", "architectures") from exc
        else:
            keys = [canonical_key(space, key, f"architectures.{i}") for i, key in enumerate(request.architectures)]
        if len(keys) > MAX_BATCH:
            raise Invalid(f"at most {MAX_BATCH} architectures per call", "architectures")
        return cls(space, request.device, request.predictor_id, keys)


def predict_from_memory(cache: PredictorCache, query: PredictQuery) -> PredictOut | None:
    """The answer when the predictor pick and every answer are in memory (no I/O, no model): what
    NAS clients asking about the same architectures again and again get; None otherwise."""
    pick = cache.pick(query.space.name, query.device, query.predictor_id)
    if pick is None:
        return None
    found = cache.remembered(pick, query.keys)
    return None if found is None else _answer(query, pick, *found)


def predict_batch(sessions: sessionmaker[Session], cache: PredictorCache, query: PredictQuery) -> PredictOut:
    pick = cache.pick(query.space.name, query.device, query.predictor_id)
    if pick is None:
        with session_scope(sessions) as session:
            device = get_device(session, query.device)
            row = predictor_for(session, query.space, device, query.predictor_id)
            pick = Pick(row.id, row.version, row.kind, row.status, device.name)
        cache.remember_pick(query.space.name, query.device, query.predictor_id, pick)
    ms, std = cache.answer(pick.predictor_id, pick.device, query.keys,
                           lambda: _checkpoint(sessions, pick.predictor_id))
    return _answer(query, pick, ms, std)


def _checkpoint(sessions: sessionmaker[Session], predictor_id: int) -> bytes:
    with session_scope(sessions) as session:
        return session.scalars(select(Predictor.checkpoint).where(Predictor.id == predictor_id)).one()


def _answer(query: PredictQuery, pick: Pick, ms: list[float], std: list[float]) -> PredictOut:
    return PredictOut(device=pick.device, space=query.space.name, predictor_id=pick.predictor_id,
                      predictor_version=pick.version, predictor_kind=pick.kind, predictor_status=pick.status,
                      architectures=query.keys, latency_ms=ms, uncertainty_ms=std)
