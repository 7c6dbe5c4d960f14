"""Client tokens for NAS code and users (admin only)."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Query, status
from sqlalchemy import select

from server.api.deps import Db, ServicesDep
from server.api.pagination import Cursor, page
from server.auth import ADMIN, hash_token
from server.errors import NotFound
from server.models import ClientToken, utcnow
from server.schemas import ClientTokenIn, ClientTokenOut, Page, RowId

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"], dependencies=[ADMIN])


def _out(row: ClientToken, token: str | None = None) -> ClientTokenOut:
    return ClientTokenOut(id=row.id, name=row.name, scopes=row.scopes, created_at=row.created_at,
                          revoked_at=row.revoked_at, token=token)


@router.post("", status_code=status.HTTP_201_CREATED)
def create_token(body: ClientTokenIn, session: Db) -> ClientTokenOut:
    """Mint a client token; the token itself is in this answer only."""
    token = secrets.token_urlsafe(32)
    row = ClientToken(name=body.name, token_hash=hash_token(token), scopes=sorted({s.value for s in body.scopes}))
    session.add(row)
    session.flush()
    return _out(row, token)


@router.get("")
def list_tokens(session: Db, cursor: Cursor = 0, limit: int = Query(100, ge=1, le=1000)) -> Page[ClientTokenOut]:
    return page(session, select(ClientToken), ClientToken.id, cursor, limit, _out)


@router.delete("/{token_id}")
def revoke_token(token_id: RowId, session: Db, services: ServicesDep) -> ClientTokenOut:
    """Revoke a client token: at once on this server, within a few seconds on the others."""
    row = session.get(ClientToken, token_id)
    if row is None:
        raise NotFound(f"no client token {token_id}", "token_id")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    services.tokens.forget(token_id)
    return _out(row)
