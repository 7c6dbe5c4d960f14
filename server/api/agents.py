"""Agent registration and job leasing."""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy import select

from agent.protocol import JobLease, RegisterRequest, RegisterResponse
from server.api.deps import CurrentAgent, Db, ServicesDep, bearer, hash_token, require_admin
from server.context import Services
from server.db import session_scope
from server.errors import Conflict, Unauthorized
from server.models import Agent, Device, DeviceState, RegistrationToken, utcnow
from server.schemas import RegistrationTokenOut
from server.services import jobs as job_service

router = APIRouter(prefix="/api/v1/agents", tags=["agents"])
POLL_INTERVAL_S = 0.25


@router.post("/registration-tokens", status_code=status.HTTP_201_CREATED, dependencies=[Depends(require_admin)])
def mint_registration_token(session: Db) -> RegistrationTokenOut:
    """A one-time token an agent exchanges for its own agent token at registration."""
    token = secrets.token_urlsafe(24)
    session.add(RegistrationToken(token_hash=hash_token(token)))
    return RegistrationTokenOut(token=token)


@router.post("/register", status_code=status.HTTP_201_CREATED)
def register(
    body: RegisterRequest,
    session: Db,
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> RegisterResponse:
    """Exchange the admin token or a one-time registration token for an agent token."""
    presented = credentials.credentials if credentials else ""
    one_time = None
    if not hmac.compare_digest(presented, services.admin_token):
        one_time = session.scalar(
            select(RegistrationToken).where(RegistrationToken.token_hash == hash_token(presented),
                                            RegistrationToken.used_at.is_(None))
        )
        if one_time is None:
            raise Unauthorized("registration needs the admin token or an unused registration token")
    token = secrets.token_urlsafe(32)
    agent = Agent(name=body.name, token_hash=hash_token(token), capabilities=body.capabilities.model_dump(),
                  last_seen=utcnow())
    session.add(agent)
    session.flush()
    if one_time is not None:
        one_time.used_at, one_time.used_by_agent_id = utcnow(), agent.id
    for spec in body.devices:
        device = session.scalar(select(Device).where(Device.name == spec.name))
        if device is None:
            device = Device(name=spec.name, source="agent")
            session.add(device)
        elif device.source == "imported":
            raise Conflict(f"{spec.name!r} is an imported reference device; agents serve devices of their own", "devices")
        attributes = dict(spec.attributes)
        device.hardware = str(attributes.get("hardware") or body.capabilities.cpu_model)
        device.category = str(attributes.get("category") or "cpu")
        device.runtime = str(attributes.get("runtime") or "onnxruntime")
        device.threads = int(attributes.get("threads") or 1)
        device.batch_size = int(attributes.get("batch_size") or 1)
        device.precision = str(attributes.get("precision") or "fp32")
        device.attributes = attributes
        device.agent_id, device.state, device.last_seen = agent.id, DeviceState.online, utcnow()
    settings = services.settings
    return RegisterResponse(agent_id=agent.id, agent_token=token, poll_wait_s=settings.poll_wait_s,
                            heartbeat_s=settings.heartbeat_s, lease_ttl_s=settings.lease_ttl_s)


def _try_claim(services: Services, agent_id: int) -> JobLease | None:
    with session_scope(services.sessions) as session:
        agent = session.get_one(Agent, agent_id)
        return job_service.claim_next(session, agent, services.store, services.settings.lease_ttl_s)


@router.get("/me/jobs/next", responses={204: {"description": "no job arrived within `wait` seconds"}})
async def next_job(agent: CurrentAgent, services: ServicesDep,
                   wait: float = Query(30, ge=0, le=120, description="long-poll seconds")) -> JobLease:
    deadline = time.monotonic() + wait
    while True:
        lease = await run_in_threadpool(_try_claim, services, agent.id)
        if lease is not None:
            return lease
        if time.monotonic() >= deadline:
            return Response(status_code=status.HTTP_204_NO_CONTENT)  # type: ignore[return-value]
        await asyncio.sleep(POLL_INTERVAL_S)
