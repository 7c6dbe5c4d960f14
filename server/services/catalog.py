"""Lookups of spaces, architectures and devices, with API errors for unknown names."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from predictor.spaces import InvalidArchitecture, SearchSpace, UnknownSpace, get_space
from server.db import insert_missing
from server.errors import Invalid, NotFound
from server.models import Architecture, Device, SearchSpaceRow


def resolve_space(name: str, field: str = "space") -> SearchSpace:
    try:
        return get_space(name)
    except UnknownSpace as exc:
        raise Invalid(str(exc), field) from exc


def canonical_key(space: SearchSpace, key: str, field: str = "architecture") -> str:
    try:
        return space.canonical(key)
    except InvalidArchitecture as exc:
        raise Invalid(f"not a valid {space.name} architecture: {exc}", field) from exc


def space_row(session: Session, space: SearchSpace) -> SearchSpaceRow:
    query = select(SearchSpaceRow).where(SearchSpaceRow.name == space.name)
    row = session.scalar(query)
    if row is None:
        description = (type(space).__doc__ or "").strip().split("\n")[0]
        insert_missing(session, SearchSpaceRow, [{"name": space.name, "description": description}])
        row = session.scalars(query).one()
    return row


def ensure_architecture(session: Session, space: SearchSpace, key: str) -> Architecture:
    """The architecture row of a canonical key, created on first use."""
    space_id = space_row(session, space).id
    query = select(Architecture).where(Architecture.space_id == space_id, Architecture.key == key)
    arch = session.scalar(query)
    if arch is None:
        insert_missing(session, Architecture, [{"space_id": space_id, "key": key}])
        arch = session.scalars(query).one()
    return arch


def get_device(session: Session, name: str, field: str = "device", *, with_agents: bool = False) -> Device:
    """The device named `name` (404 naming `field` if none); `with_agents` loads its agents in
    the same round of queries, for an answer that lists them (`DeviceOut`)."""
    query = select(Device).where(Device.name == name)
    device = session.scalar(query.options(selectinload(Device.agents)) if with_agents else query)
    if device is None:
        raise NotFound(f"unknown device {name!r}", field)
    return device


def ensure_architectures(
    session: Session, space: SearchSpace, keys: Iterable[str], dataset_index: Mapping[str, int] | None = None
) -> tuple[dict[str, int], int]:
    """Architecture ids of many canonical keys, inserting the missing ones in one statement.

    Returns the key -> id map of the whole space and how many rows were created.
    """
    space_id = space_row(session, space).id
    ids_by_key = select(Architecture.key, Architecture.id).where(Architecture.space_id == space_id)
    known = dict(session.execute(ids_by_key).all())
    missing = sorted(set(keys) - set(known))
    if missing:
        index = dataset_index or {}
        insert_missing(session, Architecture,
                       [{"space_id": space_id, "key": key, "dataset_index": index.get(key)} for key in missing])
        known = dict(session.execute(ids_by_key).all())
    return known, len(missing)
