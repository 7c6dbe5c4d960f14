"""Architectures of the search spaces, and their ONNX artifacts."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response, status
from sqlalchemy import select

from server.api.deps import Db, ServicesDep
from server.api.pagination import Cursor, page
from server.auth import READ, SUBMIT
from server.errors import NotFound
from server.models import Architecture
from server.schemas import ArchitectureIn, ArchitectureOut, ArtifactOut, Page, RowId
from server.services.artifacts import materialise
from server.services.catalog import canonical_key, ensure_architecture, resolve_space, space_row

router = APIRouter(prefix="/api/v1/architectures", tags=["architectures"])


def architecture_out(arch: Architecture) -> ArchitectureOut:
    return ArchitectureOut(id=arch.id, space=arch.space.name, key=arch.key, dataset_index=arch.dataset_index)


@router.get("", dependencies=[READ])
def list_architectures(
    session: Db,
    space: str,
    cursor: Cursor = 0,
    limit: int = Query(1000, ge=1, le=10_000),
) -> Page[ArchitectureOut]:
    space_id = space_row(session, resolve_space(space)).id
    query = select(Architecture).where(Architecture.space_id == space_id)
    return page(session, query, Architecture.id, cursor, limit, architecture_out)


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[SUBMIT])
def create_architecture(body: ArchitectureIn, session: Db, response: Response) -> ArchitectureOut:
    """Register an architecture by key; the key is validated and canonicalised. Idempotent."""
    space = resolve_space(body.space)
    key = canonical_key(space, body.key, "key")
    existing = session.scalar(
        select(Architecture).where(Architecture.space_id == space_row(session, space).id, Architecture.key == key)
    )
    if existing is not None:
        response.status_code = status.HTTP_200_OK
        return architecture_out(existing)
    return architecture_out(ensure_architecture(session, space, key))


@router.post("/{architecture_id}/artifact", dependencies=[SUBMIT])
def build_artifact(architecture_id: RowId, session: Db, services: ServicesDep) -> ArtifactOut:
    """Export the architecture to ONNX (once; later calls return the stored artifact)."""
    arch = session.get(Architecture, architecture_id)
    if arch is None:
        raise NotFound(f"no architecture {architecture_id}", "architecture_id")
    return ArtifactOut.model_validate(materialise(session, services.store, arch))
