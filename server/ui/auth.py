"""Who may see the dashboard: anyone holding a token with the `read` scope, as for the API.

The product contract puts every endpoint but /healthz and /metrics behind a token, and the
dashboard shows the same data as the read API, so it asks for the same scope. A browser cannot
send a bearer header on a link, so the token is entered once in a form and kept in an HttpOnly,
SameSite=Strict cookie scoped to /ui (scripts cannot read it, other sites cannot send it); a
bearer header works too, for scripts and tests. The form posts rather than taking `?token=`, so
the token never lands in a URL, a history entry or an access log.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials

from server.auth import Principal, Requires, bearer
from server.errors import PayloadTooLarge, Unauthorized
from server.models import Scope

COOKIE = "latfarm_ui"
COOKIE_PATH = "/ui"
HOME = "/ui/devices"
_require_read = Requires(Scope.read)


async def viewer(request: Request) -> Principal:
    """The caller, from a bearer header or the dashboard's cookie; raises Unauthorized/Forbidden."""
    credentials = await bearer(request)
    if credentials is None and (token := request.cookies.get(COOKIE)):
        credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)
    if credentials is None:
        raise Unauthorized("")  # nothing presented yet: the sign-in form, without an error
    return await _require_read(request, credentials)


async def check_token(request: Request, token: str) -> Principal:
    return await _require_read(request, HTTPAuthorizationCredentials(scheme="Bearer", credentials=token))


#: a sign-in form holds a token and a path; the form is read before any token is checked
LOGIN_FORM_MAX_BYTES = 16 * 1024


async def login_form(request: Request) -> tuple[str, str]:
    """(token, where to go next) from the urlencoded login form."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > LOGIN_FORM_MAX_BYTES:
            raise PayloadTooLarge(f"a sign-in form is at most {LOGIN_FORM_MAX_BYTES} bytes")
    form = parse_qs(body.decode(errors="replace"))
    return form.get("token", [""])[0].strip(), safe_next(form.get("next", [""])[0])


def safe_next(target: str) -> str:
    """A dashboard path to return to after signing in; anything else (another host) goes home."""
    if (target.startswith(("/ui/", "/ui?")) and not target.startswith(("/ui//", "/ui/login"))
            and "\\" not in target):
        return target
    return HOME
