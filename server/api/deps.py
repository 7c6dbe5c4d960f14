"""Request dependencies: services and database sessions (authentication is in server.auth)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from server.context import Services


# Both are async so that FastAPI runs them on the event loop: a sync dependency costs a hop to a
# worker thread and back, several per request on the hottest endpoints.
async def get_services(request: Request) -> Services:
    return request.app.state.services


async def get_session(services: Annotated[Services, Depends(get_services)]) -> AsyncIterator[Session]:
    """A session for the request (opening one does no I/O); committed, or rolled back on error, and
    closed on a worker thread."""
    session = services.sessions()
    try:
        yield session
    except BaseException:
        await run_in_threadpool(_end, session, False)
        raise
    await run_in_threadpool(_end, session, True)


def _end(session: Session, commit: bool) -> None:
    try:
        if commit:
            session.commit()
        else:
            session.rollback()
    finally:
        session.close()


# committed before the response is sent, so a client that reads after writing sees its write
Db = Annotated[Session, Depends(get_session, scope="function")]
ServicesDep = Annotated[Services, Depends(get_services)]
