"""Batch latency prediction."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from server import metrics
from server.api.deps import ServicesDep
from server.auth import PREDICT, Principal
from server.errors import Error
from server.schemas import PredictIn, PredictOut
from server.services import collections
from server.services.prediction import PredictQuery, predict_batch, predict_from_memory

router = APIRouter(prefix="/api/v1", tags=["predict"])


@router.post("/predict", responses={429: {"model": Error, "description": "the token's rate limit is reached; "
                                                                      "see Retry-After"}})
async def predict(body: PredictIn, services: ServicesDep, principal: Annotated[Principal, PREDICT]) -> PredictOut:
    """Latency in ms (and its uncertainty) of many architectures on one device, in one call: keys of
    a space, sha256s of uploaded models (space `onnx`), or every member of a `collection`.

    The device's newest ready predictor answers unless one is named; a predictor stored less than
    a second ago may not answer yet."""
    services.predict_limiter.hit("predict", principal)
    # answers already known come straight from memory; the rest takes one trip to a worker thread
    # (async: a sync endpoint would take a second trip to validate the response there)
    with metrics.PREDICT_SECONDS.time():
        members = None
        if body.collection is not None:
            members = await run_in_threadpool(collections.members_named, services.sessions, body.collection)
        query = PredictQuery.of(body, members)
        answer = predict_from_memory(services.predictors, query)
        if answer is None:
            answer = await run_in_threadpool(predict_batch, services.sessions, services.predictors, query)
    metrics.PREDICT_ARCHITECTURES.inc(len(answer.architectures))
    return answer
