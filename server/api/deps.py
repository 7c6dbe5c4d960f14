"""Request dependencies: services, database sessions, authentication."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.context import Services
from server.db import session_scope
from server.errors import Forbidden, Unauthorized
from server.models import Agent, utcnow

bearer = HTTPBearer(auto_error=False)


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_session(services: Annotated[Services, Depends(get_services)]) -> Iterator[Session]:
    with session_scope(services.sessions) as session:
        yield session


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise Unauthorized("missing bearer token")
    return credentials.credentials


def require_admin(
    services: Annotated[Services, Depends(get_services)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    if not hmac.compare_digest(_token(credentials), services.admin_token):
        raise Forbidden("this endpoint needs the admin token")


def current_agent(
    services: Annotated[Services, Depends(get_services)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Agent:
    """The calling agent, looked up in a transaction of its own so that a long poll holds no lock."""
    with session_scope(services.sessions) as session:
        agent = session.scalar(select(Agent).where(Agent.token_hash == hash_token(_token(credentials))))
        if agent is None:
            raise Unauthorized("unknown agent token")
        agent.last_seen = utcnow()
    return agent


# committed before the response is sent, so a client that reads after writing sees its write
Db = Annotated[Session, Depends(get_session, scope="function")]
CurrentAgent = Annotated[Agent, Depends(current_agent)]
ServicesDep = Annotated[Services, Depends(get_services)]
