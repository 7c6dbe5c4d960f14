"""Answering /predict and /explain: pick the predictor that serves a device, answer from memory
when every answer is known, else from the loaded model."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from predictor.explain import explain
from predictor.spaces import SearchSpace
from server.db import session_scope
from server.errors import Conflict, Invalid
from server.models import Device, Predictor, PredictorKind
from server.schemas import ExplainOut, PredictIn, PredictOut
from server.services.answer_cache import Pick, PredictorCache
from server.services.catalog import canonical_key, get_device, resolve_space
from server.services.predictors import predictor_for

MAX_BATCH = 100_000


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
    def of(cls, request: PredictIn, members: list[str] | None = None) -> PredictQuery:
        """`members`: the keys of the request's collection, if it names one."""
        space = resolve_space(request.space)
        if members is not None:
            keys = [canonical_key(space, key, f"collection.{i}") for i, key in enumerate(members)]
        elif request.architectures == "all":
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
