"""Who is calling, and may they: bearer tokens resolved to principals with scopes.

Three kinds of token: the admin token (every scope but `agent`), client tokens minted by an admin
for NAS code (any of read, predict, submit) and agent tokens (`agent` alone; an agent may only
touch jobs leased to it). Tokens are stored as sha256 hashes. Resolved tokens are cached for
`TOKEN_CACHE_S` seconds, so a revocation reaches other server processes within that time.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as ASGIScope

from server.db import session_scope
from server.errors import (
    DATABASE_UNAVAILABLE,
    ApiError,
    Forbidden,
    Unauthorized,
    database_unavailable,
    error_response,
)
from server.models import Agent, AgentDevice, ClientToken, RegistrationToken, Scope

TOKEN_CACHE_S = 10.0
ADMIN_SCOPES = frozenset({Scope.read, Scope.predict, Scope.submit, Scope.admin})
CLIENT_SCOPES = frozenset({Scope.read, Scope.predict, Scope.submit})

bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def tokens_equal(presented: str, expected: str) -> bool:
    """A constant-time comparison that takes any text (`hmac.compare_digest` raises TypeError on
    non-ASCII strings; a header may carry any latin-1 character)."""
    return hmac.compare_digest(presented.encode(), expected.encode())


@dataclass(frozen=True)
class Principal:
    kind: Literal["admin", "client", "agent"]
    scopes: frozenset[Scope]
    agent_id: int | None = None
    #: the devices an agent serves (as of the lookup: for waking its long polls, not for access)
    device_ids: tuple[int, ...] = ()
    token_id: int | None = None


class TokenCache:
    """token hash -> principal, for a few seconds; unknown tokens are not cached."""

    def __init__(self, ttl_s: float = TOKEN_CACHE_S) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    def get(self, token_hash: str) -> Principal | None:
        with self._lock:
            entry = self._entries.get(token_hash)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def put(self, token_hash: str, principal: Principal) -> None:
        with self._lock:
            self._entries[token_hash] = (principal, time.monotonic() + self.ttl_s)

    def forget(self, token_id: int) -> None:
        with self._lock:
            self._entries = {h: e for h, e in self._entries.items() if e[0].token_id != token_id}

    def forget_agent(self, agent_id: int) -> None:
        """Drop an agent's entry (its devices changed at re-registration)."""
        with self._lock:
            self._entries = {h: e for h, e in self._entries.items() if e[0].agent_id != agent_id}


async def authenticate(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    """The caller's principal; the database is asked (on a worker thread) only on a cache miss."""
    services = request.app.state.services
    if credentials is None or not credentials.credentials:
        raise Unauthorized("missing bearer token")
    token = credentials.credentials
    if tokens_equal(token, services.admin_token):
        return Principal("admin", ADMIN_SCOPES)
    token_hash = hash_token(token)
    principal = services.tokens.get(token_hash)
    if principal is None:
        principal = await run_in_threadpool(_lookup, services.sessions, token_hash)
        services.tokens.put(token_hash, principal)
    return principal


def _lookup(sessions, token_hash: str) -> Principal:  # type: ignore[no-untyped-def]
    with session_scope(sessions) as session:
        agent_id = session.scalar(select(Agent.id).where(Agent.token_hash == token_hash, Agent.revoked_at.is_(None)))
        if agent_id is not None:
            devices = session.scalars(select(AgentDevice.device_id).where(AgentDevice.agent_id == agent_id))
            return Principal("agent", frozenset({Scope.agent}), agent_id=agent_id, device_ids=tuple(devices))
        client = session.scalar(
            select(ClientToken).where(ClientToken.token_hash == token_hash, ClientToken.revoked_at.is_(None))
        )
        if client is not None:
            return Principal("client", frozenset(Scope(s) for s in client.scopes), token_id=client.id)
    raise Unauthorized("unknown or revoked token")


class Requires:
    """A dependency that lets a request through when its token holds any of `scopes`."""

    def __init__(self, *scopes: Scope) -> None:
        self.scopes = frozenset(scopes)

    async def __call__(self, request: Request, credentials: Credentials) -> Principal:
        principal = getattr(request.state, "principal", None) or await authenticate(request, credentials)
        if not principal.scopes & self.scopes:
            needed = " or ".join(sorted(s.value for s in self.scopes))
            held = ", ".join(sorted(s.value for s in principal.scopes)) or "none"
            raise Forbidden(f"this endpoint needs the {needed} scope; the {principal.kind} token holds {held}")
        return principal


READ = Depends(Requires(Scope.read))
PREDICT = Depends(Requires(Scope.predict))
SUBMIT = Depends(Requires(Scope.submit))
ADMIN = Depends(Requires(Scope.admin))
AgentPrincipal = Annotated[Principal, Depends(Requires(Scope.agent))]


#: the one API route that takes a token other than a principal's (a one-time registration token)
REGISTER_PATH = "/api/v1/agents/register"


class AuthenticateFirst:
    """Resolves the bearer token of every API request before anything reads its body, so a client
    without a valid token gets its 401 before the server reads (and parses) a byte of what it sent.
    FastAPI reads and validates a body before it runs the route's dependencies. The principal is
    left in the request's state for `Requires`, which checks the scope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/v1/"):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            credentials = await bearer(request)
            if scope["path"] == REGISTER_PATH:
                await _check_registrant(request, credentials)
            else:
                scope.setdefault("state", {})["principal"] = await authenticate(request, credentials)
        except ApiError as exc:
            await error_response(exc)(scope, receive, send)
            return
        except DATABASE_UNAVAILABLE as exc:  # outside the app's exception handlers
            await database_unavailable(scope["method"], scope["path"], exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _check_registrant(request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
    """Registration takes the admin token, an agent's own token or an unused registration token;
    which one is decided (atomically) by the registration itself."""
    try:
        principal = await authenticate(request, credentials)
    except Unauthorized:
        if credentials is None or not await run_in_threadpool(
                _registration_token_unused, request.app.state.services.sessions, hash_token(credentials.credentials)):
            raise
        return
    if principal.kind == "client":
        raise Forbidden("registration takes the admin token, an agent token or a registration token")


def _registration_token_unused(sessions: sessionmaker[Session], token_hash: str) -> bool:
    with session_scope(sessions) as session:
        return session.scalar(select(RegistrationToken.id).where(
            RegistrationToken.token_hash == token_hash, RegistrationToken.used_at.is_(None))) is not None
