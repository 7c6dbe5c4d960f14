"""Collections: named sets of uploaded ONNX models."""

from __future__ import annotations

from fastapi import APIRouter, Query, status
from sqlalchemy import select

from server.api.deps import Db
from server.api.pagination import Cursor, page
from server.auth import READ, SUBMIT
from server.models import Collection
from server.schemas import CollectionIn, CollectionName, CollectionOut, Page
from server.services import collections

router = APIRouter(prefix="/api/v1/collections", tags=["collections"])


def collection_out(collection: Collection) -> CollectionOut:
    return CollectionOut(name=collection.name, artifacts=collections.members(collection),
                         created_at=collection.created_at)


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[SUBMIT])
def create_collection(body: CollectionIn, session: Db) -> CollectionOut:
    """Name a set of uploaded ONNX models; each must be one the graph encoder reads (422 naming the
    node otherwise). Onboard a device for it, and predict it, with `collection`."""
    return collection_out(collections.create(session, body.name, body.artifacts))


@router.get("", dependencies=[READ])
def list_collections(session: Db, cursor: Cursor = 0,
                     limit: int = Query(1000, ge=1, le=10_000)) -> Page[CollectionOut]:
    return page(session, select(Collection), Collection.id, cursor, limit, collection_out)


@router.get("/{name}", dependencies=[READ])
def read_collection(name: CollectionName, session: Db) -> CollectionOut:
    return collection_out(collections.get(session, name, "name"))
