"""Agent registration and job leasing."""

from __future__ import annotations

import hmac
import secrets
import time

from fastapi import APIRouter, Query, Request, Response, status
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from agent.protocol import JobLease, RegisterRequest, RegisterResponse
from server.api.deps import Db, ServicesDep
from server.auth import ADMIN, AgentPrincipal, Credentials, hash_token
from server.context import Services
from server.db import insert_missing, session_scope
from server.errors import Conflict, Invalid, Unauthorized
from server.models import Agent, AgentDevice, Device, DeviceState, RegistrationToken, utcnow
from server.schemas import INT_MAX, RegistrationTokenOut
from server.services import health

router = APIRouter(prefix="/api/v1/agents", tags=["agents"])
#: a long poll re-checks the queue this often even without a wake-up (e.g. from another server)
RECHECK_S = 2.0


@router.post("/registration-tokens", status_code=status.HTTP_201_CREATED, dependencies=[ADMIN])
def mint_registration_token(session: Db) -> RegistrationTokenOut:
    """A one-time token an agent exchanges for its own agent token at registration."""
    token = secrets.token_urlsafe(24)
    session.add(RegistrationToken(token_hash=hash_token(token)))
    return RegistrationTokenOut(token=token)


@router.post("/register", status_code=status.HTTP_201_CREATED)
def register(body: RegisterRequest, session: Db, services: ServicesDep,
             credentials: Credentials) -> RegisterResponse:
    """Exchange the admin token or a one-time registration token for an agent token.

    An agent that presents its own agent token (after a restart) is registered again as the
    same agent, keeping its id and token. Every registered device gets a canary job.
    """
    names = [spec.name for spec in body.devices]
    if len(set(names)) < len(names):
        raise Invalid("a device is listed more than once", "devices")
    presented = credentials.credentials if credentials else ""
    agent, token = _registrant(session, services, presented)
    agent.name, agent.capabilities, agent.last_seen = body.name, body.capabilities.model_dump(), utcnow()
    session.flush()
    session.execute(delete(AgentDevice).where(AgentDevice.agent_id == agent.id))
    for spec in body.devices:
        device = _serve_device(session, spec.name, dict(spec.attributes), body.capabilities.cpu_model)
        session.add(AgentDevice(agent_id=agent.id, device_id=device.id))
        health.queue_canary(session, device, services.settings)
    services.tokens.forget_agent(agent.id)
    settings = services.settings
    return RegisterResponse(agent_id=agent.id, agent_token=token, poll_wait_s=settings.poll_wait_s,
                            heartbeat_s=settings.heartbeat_s, lease_ttl_s=settings.lease_ttl_s)


def _registrant(session: Session, services: Services, presented: str) -> tuple[Agent, str]:
    """The agent to (re-)register and its token, from the token the caller presented."""
    known = session.scalar(select(Agent).where(Agent.token_hash == hash_token(presented)))
    if known is not None:
        return known, presented
    if not hmac.compare_digest(presented, services.admin_token):
        one_time = session.scalar(
            select(RegistrationToken)
            .where(RegistrationToken.token_hash == hash_token(presented), RegistrationToken.used_at.is_(None))
            .with_for_update()
        )
        if one_time is None:
            raise Unauthorized("registration needs the admin token, an unused registration token or an agent token")
    token = secrets.token_urlsafe(32)
    agent = Agent(name="", token_hash=hash_token(token))
    session.add(agent)
    session.flush()
    if not hmac.compare_digest(presented, services.admin_token):
        one_time.used_at, one_time.used_by_agent_id = utcnow(), agent.id
    return agent, token


def _serve_device(session: Session, name: str, attributes: dict[str, object], cpu_model: str) -> Device:
    insert_missing(session, Device, [{"name": name, "source": "agent"}])
    device = session.scalars(select(Device).where(Device.name == name).with_for_update()).one()
    if device.source == "imported":
        raise Conflict(f"{name!r} is an imported reference device; agents serve devices of their own", "devices")
    device.hardware = str(attributes.get("hardware") or cpu_model)
    device.category = str(attributes.get("category") or "cpu")
    device.runtime = str(attributes.get("runtime") or "onnxruntime")
    device.threads = _count(attributes, "threads")
    device.batch_size = _count(attributes, "batch_size")
    device.precision = str(attributes.get("precision") or "fp32")
    device.attributes = attributes
    if device.state is DeviceState.offline:
        device.state, device.state_reason = DeviceState.online, None
    device.last_seen = utcnow()
    session.flush()
    return device


def _count(attributes: dict[str, object], key: str) -> int:
    """A device's thread count or batch size: a positive integer, 1 when not given."""
    try:
        count = int(attributes.get(key) or 1)  # type: ignore[call-overload]
    except (ValueError, OverflowError):  # "four", nan, inf
        count = 0
    if not 1 <= count <= INT_MAX:
        raise Invalid(f"device attribute {key!r} must be a positive integer, got {attributes.get(key)!r}", "devices")
    return count


def _try_claim(services: Services, agent_id: int) -> JobLease | None:
    try:
        with session_scope(services.sessions) as session:
            return services.leases.claim(session, agent_id)
    except IntegrityError:  # another agent of the same device won it a moment ago
        return None


def _hand_back(services: Services, lease: JobLease) -> None:
    with session_scope(services.sessions) as session:
        services.leases.hand_back(session, lease)


@router.get("/me/jobs/next", responses={204: {"description": "no job arrived within `wait` seconds"}})
async def next_job(request: Request, agent: AgentPrincipal, services: ServicesDep,
                   wait: float = Query(30, ge=0, le=120, description="long-poll seconds")) -> JobLease:
    """Lease the next job for one of the agent's devices, waiting up to `wait` seconds for one.
    A poll whose agent hung up leases nothing: a lease claimed for it meanwhile goes back to the
    queue (it would sit leased to no one until it expired)."""
    assert agent.agent_id is not None
    deadline = time.monotonic() + wait
    with services.wakeup.subscription(agent.device_ids) as changed:
        while True:
            changed.clear()
            if await request.is_disconnected():
                return Response(status_code=status.HTTP_204_NO_CONTENT)  # type: ignore[return-value]
            lease = await services.leases.on_thread(_try_claim, services, agent.agent_id)
            if lease is not None:
                if not await request.is_disconnected():
                    return lease
                await services.leases.on_thread(_hand_back, services, lease)  # it hung up while the claim ran
                return Response(status_code=status.HTTP_204_NO_CONTENT)  # type: ignore[return-value]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Response(status_code=status.HTTP_204_NO_CONTENT)  # type: ignore[return-value]
            await services.wakeup.wait(changed, min(remaining, RECHECK_S))
