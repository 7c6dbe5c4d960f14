"""The installed search spaces."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import Db
from server.auth import READ
from server.schemas import Page, SpaceOut
from server.services import spaces

router = APIRouter(prefix="/api/v1/spaces", tags=["spaces"])


@router.get("", dependencies=[READ])
def list_spaces(session: Db) -> Page[SpaceOut]:
    """Every installed space (latfarm's own and those installed packages register in the
    `latfarm.spaces` entry-point group), by name: one page."""
    return Page(items=spaces.describe_all(session), next_cursor=None)
