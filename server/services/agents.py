"""Agents as admins see them: listed with their devices, and revoked."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from server.errors import NotFound
from server.models import Agent, AgentDevice, Device, Job, JobStatus, utcnow
from server.schemas import AgentOut
from server.services.jobs import hand_back


def describe(session: Session, agent: Agent) -> AgentOut:
    devices = session.scalars(select(Device.name).join(AgentDevice).where(AgentDevice.agent_id == agent.id)
                              .order_by(Device.name))
    return AgentOut(id=agent.id, name=agent.name, devices=list(devices), created_at=agent.created_at,
                    last_seen=agent.last_seen, revoked_at=agent.revoked_at)


def revoke(session: Session, agent_id: int) -> Agent:
    """Refuse the agent's token from now on, unbind its devices and put the jobs leased to it back
    in the queue (their attempts uncounted: the agent was removed, the jobs did not fail)."""
    agent = session.get(Agent, agent_id, with_for_update=True)
    if agent is None:
        raise NotFound(f"no agent {agent_id}", "agent_id")
    if agent.revoked_at is None:
        agent.revoked_at = utcnow()
    session.execute(delete(AgentDevice).where(AgentDevice.agent_id == agent_id))
    for job in session.scalars(select(Job).where(Job.agent_id == agent_id, Job.status == JobStatus.running)
                               .with_for_update(of=Job)):
        hand_back(session, job)
    session.flush()
    return agent
