"""Liveness and Prometheus metrics."""

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from server import __version__
from server.api.deps import Db, ServicesDep
from server.metrics import exposition

router = APIRouter(tags=["system"])


@router.get("/healthz")
def healthz(session: Db) -> dict[str, str]:
    session.execute(text("SELECT 1"))
    return {"status": "ok", "version": __version__}


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(services: ServicesDep) -> Response:
    """Prometheus text exposition: job, lease, retry and predict events, queue depth, heartbeat
    age per agent, canary drift per device. Public, like /healthz, so a scraper needs no token."""
    body = await run_in_threadpool(exposition, services.sessions)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
