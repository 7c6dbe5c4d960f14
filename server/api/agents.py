"""Agents: registration, listing and revocation (admin), and job leasing."""

from __future__ import annotations

import secrets
import time
from functools import partial

from fastapi import APIRouter, Query, Request, Response, status
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from agent.protocol import JobLease, RegisterRequest, RegisterResponse
from server.api.deps import Db, ServicesDep
from server.api.pagination import Cursor, page
from server.auth import ADMIN, AgentPrincipal, Credentials, hash_token
from server.context import Services
from server.db import session_scope
from server.models import Agent, RegistrationToken
from server.schemas import AgentOut, Page, RegistrationTokenOut, RowId
from server.services import agents as agent_service
from server.services import registration

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
    same agent, keeping its id and token, for the devices it was registered for or fewer (403 for
    another device: that takes the admin or a registration token). Every registered device gets a
    canary job.
    """
    return registration.register(session, services, body, credentials.credentials if credentials else "")


@router.get("", dependencies=[ADMIN])
def list_agents(session: Db, cursor: Cursor = 0, limit: int = Query(100, ge=1, le=1000)) -> Page[AgentOut]:
    """Agents with the devices their tokens serve; revoked ones too, with the time of revocation."""
    return page(session, select(Agent), Agent.id, cursor, limit, partial(agent_service.describe, session))


@router.delete("/{agent_id}", dependencies=[ADMIN])
def revoke_agent(agent_id: RowId, session: Db, services: ServicesDep) -> AgentOut:
    """Revoke an agent: its token is refused at once on this server and within the token cache
    time (10 s) on the others; the jobs leased to it go back to the queue."""
    agent = agent_service.revoke(session, agent_id)
    services.tokens.forget_agent(agent_id)
    return agent_service.describe(session, agent)


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
    An agent may hold `LATFARM_MAX_POLLS_PER_AGENT` polls open at once and a server process
    `LATFARM_MAX_POLLS` in all (429 with Retry-After above either). A poll whose agent hung up
    leases nothing: a lease claimed for it meanwhile goes back to the queue (it would sit leased
    to no one until it expired)."""
    assert agent.agent_id is not None
    deadline = time.monotonic() + wait
    with services.polls.hold(agent.agent_id), services.wakeup.subscription(agent.device_ids) as changed:
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
