"""Batch latency prediction."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from server import metrics
from server.api.deps import Db, ServicesDep
from server.auth import PREDICT, Principal
from server.errors import Error
from server.schemas import PredictIn, PredictOut
from server.services.predictors import predict_batch

router = APIRouter(prefix="/api/v1", tags=["predict"])


@router.post("/predict", responses={429: {"model": Error, "description": "the token's rate limit is reached; "
                                                                      "see Retry-After"}})
async def predict(body: PredictIn, session: Db, services: ServicesDep,
                  principal: Annotated[Principal, PREDICT]) -> PredictOut:
    """Latency in ms (and its uncertainty) of many architectures on one device, in one call."""
    services.predict_limiter.hit("predict", principal)
    # async, with the work in one trip to a worker thread: a sync endpoint would take a second
    # trip to validate the response there
    with metrics.PREDICT_SECONDS.time():
        answer = await run_in_threadpool(predict_batch, session, services.predictors, body)
    metrics.PREDICT_ARCHITECTURES.inc(len(answer.architectures))
    return answer
