"""Request dependencies: services and database sessions (authentication is in server.auth)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from server.context import Services
from server.db import session_scope


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_session(services: Annotated[Services, Depends(get_services)]) -> Iterator[Session]:
    with session_scope(services.sessions) as session:
        yield session


# committed before the response is sent, so a client that reads after writing sees its write
Db = Annotated[Session, Depends(get_session, scope="function")]
ServicesDep = Annotated[Services, Depends(get_services)]
