"""/predict is rate limited per token, with a 429 that says when to come back."""

from __future__ import annotations

from pathlib import Path

import httpx

from server.cli.local import running_server
from server.db import upgrade
from server.settings import Settings

ADMIN = "limit-admin"


def test_predict_rate_limit_is_per_token(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'limit.db'}"
    upgrade(url)
    settings = Settings(database_url=url, artifact_dir=tmp_path / "artifacts", admin_token=ADMIN,
                        predict_rate_limit="3/minute")
    body = {"device": "nowhere", "space": "nb201", "architectures": "all"}
    with running_server(settings) as server, httpx.Client(base_url=f"{server}/api/v1") as http:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        client_token = http.post("/tokens", json={"name": "nas", "scopes": ["predict"]}, headers=admin).json()["token"]
        codes = [http.post("/predict", json=body, headers=admin).status_code for _ in range(4)]
        limited = http.post("/predict", json=body, headers=admin)
        other = http.post("/predict", json=body, headers={"Authorization": f"Bearer {client_token}"})
    assert codes == [404, 404, 404, 429]  # every call counts, answered or not
    assert limited.status_code == 429 and "3 per 1 minute" in limited.json()["detail"]
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert other.status_code == 404  # a window of its own
