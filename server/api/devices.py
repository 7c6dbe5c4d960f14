"""Devices: latency targets (hardware + runtime + settings)."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Query, Response, status
from sqlalchemy import exists, select
from sqlalchemy.orm import selectinload

from server.api.deps import Db, ServicesDep
from server.api.onboardings import onboarding_out
from server.api.pagination import Cursor, page
from server.auth import ADMIN, READ, SUBMIT
from server.errors import Conflict
from server.models import Architecture, Device, Job, Measurement
from server.schemas import DeviceIn, DeviceOut, DevicePatch, ExplainOut, OnboardIn, OnboardingOut, Page
from server.services import collections, prediction
from server.services import onboarding as onboarding_service
from server.services.catalog import get_device, resolve_space, space_row

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])


@router.get("", dependencies=[READ])
def list_devices(session: Db, space: str | None = Query(None, description="only devices measured in this space"),
                 cursor: Cursor = 0, limit: int = Query(1000, ge=1, le=10_000)) -> Page[DeviceOut]:
    # the agents load with the devices: a lazy load per device would run inside the answer's
    # validation, where a database that went away surfaces as a 500, not a 503
    query = select(Device).options(selectinload(Device.agents))
    if space is not None:
        space_id = space_row(session, resolve_space(space)).id
        query = query.where(
            exists()
            .where(Measurement.device_id == Device.id)
            .where(Measurement.architecture_id.in_(select(Architecture.id).where(Architecture.space_id == space_id)))
        )
    return page(session, query, Device.id, cursor, limit, DeviceOut.model_validate)


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[ADMIN])
def create_device(body: DeviceIn, session: Db) -> DeviceOut:
    if session.scalar(select(Device).where(Device.name == body.name)) is not None:
        raise Conflict(f"device {body.name!r} already exists", "name")
    device = Device(**body.model_dump(), source="user", agents=[])
    session.add(device)
    session.flush()
    return DeviceOut.model_validate(device)


@router.post("/{name:path}/onboard", status_code=status.HTTP_202_ACCEPTED, dependencies=[SUBMIT])
def onboard(name: str, body: OnboardIn, session: Db, services: ServicesDep,
            background: BackgroundTasks) -> OnboardingOut:
    """Measure sampler-chosen architectures on the device, then adapt a predictor to it."""
    device = get_device(session, name)
    collection = collections.get(session, body.collection) if body.collection is not None else None
    started = onboarding_service.start(session, services.settings, services.predictors, device,
                                       resolve_space(body.space), body.samples, body.sampler, body.preset, body.seed,
                                       body.budget, body.target_uncertainty, collection)
    # every sample may already have been measured: then adaptation can start now
    background.add_task(onboarding_service.finish_if_measured, services.sessions, started.id)
    return onboarding_out(session, started)


@router.get("/{name:path}/explain", dependencies=[READ])
def explain_device(name: str, session: Db, services: ServicesDep, space: str = "nb201") -> ExplainOut:
    """Which reference devices this device resembles, and what each operation costs on it compared
    with them, from its newest adapted predictor."""
    device = get_device(session, name, "name")
    return prediction.explanation(session, services.predictors, device, resolve_space(space))


@router.get("/{name:path}", dependencies=[READ])
def read_device(name: str, session: Db) -> DeviceOut:
    return DeviceOut.model_validate(get_device(session, name, "name", with_agents=True))


@router.patch("/{name:path}", dependencies=[ADMIN])
def update_device(name: str, body: DevicePatch, session: Db) -> DeviceOut:
    device = get_device(session, name, "name", with_agents=True)
    # a null leaves the field as it is: none of them may be empty
    for field, value in body.model_dump(exclude_unset=True, exclude_none=True).items():
        setattr(device, field, value)
    return DeviceOut.model_validate(device)


@router.delete("/{name:path}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[ADMIN])
def delete_device(name: str, session: Db) -> Response:
    device = get_device(session, name, "name")
    if session.scalar(select(exists().where(Measurement.device_id == device.id))) or session.scalar(
        select(exists().where(Job.device_id == device.id))
    ):
        raise Conflict(f"device {name!r} has jobs or measurements; set its state to 'retired' instead", "name")
    session.delete(device)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
