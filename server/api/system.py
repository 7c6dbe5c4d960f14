"""Liveness."""

from fastapi import APIRouter
from sqlalchemy import text

from server import __version__
from server.api.deps import Db

router = APIRouter(tags=["system"])


@router.get("/healthz")
def healthz(session: Db) -> dict[str, str]:
    session.execute(text("SELECT 1"))
    return {"status": "ok", "version": __version__}
