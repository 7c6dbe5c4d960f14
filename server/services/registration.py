"""Agent registration: an agent token in exchange for the admin token or a one-time registration
token (or the agent's own token, after a restart), and the devices the agent serves.

An agent token is bound to the devices it was registered for: presented again (after a restart)
it may name those devices or fewer, never another one. Serving a further device takes the admin
token or a registration token, which register a new agent. A one-time registration token is
spent by a single conditional UPDATE, so of many registrations racing with it exactly one wins on
SQLite as on Postgres.
"""

from __future__ import annotations

import secrets

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from agent.protocol import RegisterRequest, RegisterResponse
from server.auth import hash_token, tokens_equal
from server.context import Services
from server.db import insert_missing
from server.errors import Conflict, Forbidden, Invalid, Unauthorized
from server.models import Agent, AgentDevice, Device, DeviceState, RegistrationToken, utcnow
from server.schemas import INT_MAX
from server.services import health


def register(session: Session, services: Services, body: RegisterRequest, presented: str) -> RegisterResponse:
    """Register the agent (again, as the same agent, when it presents its own token); every device
    it serves gets a canary job."""
    names = [spec.name for spec in body.devices]
    if len(set(names)) < len(names):
        raise Invalid("a device is listed more than once", "devices")
    agent, token = _registrant(session, services.admin_token, presented, names)
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


def _registrant(session: Session, admin_token: str, presented: str, names: list[str]) -> tuple[Agent, str]:
    """The agent to (re-)register and its token, from the token the caller presented."""
    one_time = None
    if not tokens_equal(presented, admin_token):
        # spent here or not at all: the UPDATE's condition is checked under the row's write lock
        one_time = session.scalar(
            update(RegistrationToken)
            .where(RegistrationToken.token_hash == hash_token(presented), RegistrationToken.used_at.is_(None))
            .values(used_at=utcnow())
            .returning(RegistrationToken.id)
        )
        if one_time is None:
            return _known_agent(session, presented, names), presented
    token = secrets.token_urlsafe(32)
    agent = Agent(name="", token_hash=hash_token(token))
    session.add(agent)
    session.flush()
    if one_time is not None:
        session.execute(update(RegistrationToken).where(RegistrationToken.id == one_time)
                        .values(used_by_agent_id=agent.id))
    return agent, token


def _known_agent(session: Session, token: str, names: list[str]) -> Agent:
    agent = session.scalar(select(Agent).where(Agent.token_hash == hash_token(token), Agent.revoked_at.is_(None)))
    if agent is None:
        raise Unauthorized("registration needs the admin token, an unused registration token or an agent token")
    bound = set(session.scalars(select(Device.name).join(AgentDevice).where(AgentDevice.agent_id == agent.id)))
    if unbound := sorted(set(names) - bound):
        raise Forbidden(f"this agent token serves {sorted(bound)}; serving {unbound} as well takes the admin token "
                        "or a registration token", "devices")
    return agent


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
