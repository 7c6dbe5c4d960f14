"""What the installed search spaces are (`GET /api/v1/spaces`): the registry's spaces, with the
reference devices and base predictors the database holds for them."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from predictor.spaces import SearchSpace, get_space, reference_spaces, space_names
from server.models import Device, Predictor, PredictorKind, SearchSpaceRow
from server.schemas import SpaceOut
from server.services.datasets import IMPORTED
from server.services.predictors import LATEST_FIRST


def describe_all(session: Session) -> list[SpaceOut]:
    tables = _imported_devices_by_space(session)
    bases = _latest_bases(session)
    learned_from = sorted({device for space in reference_spaces() for device in tables.get(space.name, [])})
    spaces = [get_space(name) for name in space_names()]
    return [_describe(space, learned_from if space.graph_encoded else tables.get(space.name, []),
                      bases.get(space.name)) for space in spaces]


def _describe(space: SearchSpace, devices: list[str], base_id: int | None) -> SpaceOut:
    bounded = space.is_bounded()
    return SpaceOut(
        name=space.name, description=(type(space).__doc__ or "").strip().split("\n")[0],
        size=space.size() if bounded else None, key_format=space.key_format,
        example_key=space.sample(1, seed=0)[0] if bounded else None,
        has_reference_tables=space.has_reference_tables, builds_networks=space.builds_networks,
        graph_encoded=space.graph_encoded, reference_devices=devices, base_predictor_id=base_id,
    )


def _imported_devices_by_space(session: Session) -> dict[str, list[str]]:
    """Space name -> the imported devices with a table for it (as the import recorded them)."""
    found: dict[str, list[str]] = {}
    for name, attributes in session.execute(
            select(Device.name, Device.attributes).where(Device.source == IMPORTED).order_by(Device.name)):
        for space in (attributes or {}).get("spaces", {}):
            found.setdefault(space, []).append(name)
    return found


def _latest_bases(session: Session) -> dict[str, int]:
    """Space name -> the id of its latest base predictor (`predictors.latest_base`, for every
    space in one query and without the checkpoints)."""
    latest: dict[str, int] = {}
    for name, predictor_id in session.execute(
            select(SearchSpaceRow.name, Predictor.id)
            .join(Predictor, Predictor.space_id == SearchSpaceRow.id)
            .where(Predictor.kind == PredictorKind.base)
            .order_by(*LATEST_FIRST)):
        latest.setdefault(name, predictor_id)
    return latest
