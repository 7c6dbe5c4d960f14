"""Every endpoint declares a scope, and a token without it is refused (401 without a token,
403 with a token that lacks the scope), against a real server."""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi.routing import APIRoute

from server.app import ROUTERS
from server.auth import Requires
from server.models import Scope

PUBLIC = {"/healthz", "/metrics"}
#: authenticates with a registration, admin or agent token of its own (tested in test_api)
OWN_AUTH = {"/api/v1/agents/register"}
PATH_VALUES = {"sha256": "0" * 64, "name": "some-device"}


def declared_scopes(route: APIRoute) -> frozenset[Scope] | None:
    pending = list(route.dependant.dependencies)
    while pending:
        dependency = pending.pop()
        if isinstance(dependency.call, Requires):
            return dependency.call.scopes
        pending.extend(dependency.dependencies)
    return None


def api_routes() -> list[tuple[str, str, frozenset[Scope]]]:
    routes = []
    for route in (route for router in ROUTERS for route in router.routes):
        if not isinstance(route, APIRoute) or route.path in PUBLIC | OWN_AUTH:
            continue
        scopes = declared_scopes(route)
        assert scopes, f"{route.path} declares no scope"
        path = re.sub(r"\{(\w+)(?::path)?\}", lambda m: PATH_VALUES.get(m.group(1), "1"), route.path)
        routes.extend((method, path, scopes) for method in route.methods)
    return routes


@pytest.fixture(scope="module")
def routes() -> list[tuple[str, str, frozenset[Scope]]]:
    return api_routes()


def test_every_endpoint_declares_a_scope(routes: list[tuple[str, str, frozenset[Scope]]]) -> None:
    by_path = {(method, path): scopes for method, path, scopes in routes}
    assert by_path[("POST", "/api/v1/predict")] == {Scope.predict}
    assert by_path[("POST", "/api/v1/jobs")] == {Scope.submit}
    assert by_path[("GET", "/api/v1/jobs")] == {Scope.read}
    assert by_path[("POST", "/api/v1/jobs/1/result")] == {Scope.agent}
    assert by_path[("POST", "/api/v1/tokens")] == {Scope.admin}
    assert len(routes) >= 25


def test_wrong_tokens_are_refused(routes: list[tuple[str, str, frozenset[Scope]]], root: httpx.Client,
                                  api: httpx.Client) -> None:
    """No token: 401. A client token holding every scope but the needed one(s): 403."""
    client_scopes = {Scope.read, Scope.predict, Scope.submit}
    tokens: dict[frozenset[Scope], str] = {}
    for _, _, needed in routes:
        others = sorted(s.value for s in client_scopes - needed) or ["read"]
        if needed not in tokens:
            minted = api.post("/tokens", json={"name": f"lacks-{'-'.join(sorted(s.value for s in needed))}",
                                               "scopes": others})
            assert minted.status_code == 201, minted.text
            tokens[needed] = minted.json()["token"]
    for method, path, needed in routes:
        anonymous = root.request(method, path, json={})
        assert anonymous.status_code == 401, (method, path, anonymous.text)
        assert anonymous.headers["www-authenticate"] == "Bearer"
        bad = root.request(method, path, json={}, headers={"Authorization": "Bearer not-a-token"})
        assert bad.status_code == 401, (method, path, bad.text)
        lacking = root.request(method, path, json={}, headers={"Authorization": f"Bearer {tokens[needed]}"})
        assert lacking.status_code == 403, (method, path, needed, lacking.text)
        assert "scope" in lacking.json()["detail"]


def test_client_token_scopes_and_revocation(api: httpx.Client, anonymous: httpx.Client) -> None:
    minted = api.post("/tokens", json={"name": "nas-search", "scopes": ["read", "predict"]})
    assert minted.status_code == 201
    token = minted.json()
    assert token["scopes"] == ["predict", "read"] and token["token"]
    listed = {t["id"]: t for t in api.get("/tokens").json()["items"]}
    assert listed[token["id"]]["token"] is None  # shown once only
    nas = {"Authorization": f"Bearer {token['token']}"}
    assert anonymous.get("/devices", headers=nas).status_code == 200
    assert anonymous.post("/jobs", json={}, headers=nas).status_code == 403
    assert api.delete(f"/tokens/{token['id']}").json()["revoked_at"] is not None
    assert anonymous.get("/devices", headers=nas).status_code == 401
    # a client token cannot hold admin or agent scopes
    assert api.post("/tokens", json={"name": "x", "scopes": ["admin"]}).status_code == 422
    assert api.post("/tokens", json={"name": "x", "scopes": ["agent"]}).status_code == 422
