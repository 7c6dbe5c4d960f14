"""The job API and the server's side of the agent protocol, driven over real HTTP by a scripted
agent (it posts chosen timings, so health and retry rules can be tested exactly) against a real
server on each backend, with short intervals."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.api import agents as agents_api
from server.cli.local import running_server, temporary_postgres_database
from server.db import upgrade
from server.settings import Settings
from tests.helpers import CAPABILITIES, POSTGRES_ADMIN_URL, ScriptedAgent, scrape, wait_until

ADMIN = "jobs-admin"
ARCH = "|nor_conv_1x1~0|+|skip_connect~0|nor_conv_3x3~1|+|skip_connect~0|avg_pool_3x3~1|nor_conv_1x1~2|"
OTHER_ARCH = "|nor_conv_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|avg_pool_3x3~0|none~1|nor_conv_3x3~2|"
CANARY_EVERY = 2


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def farm_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("farm")
    fast: dict[str, Any] = {"lease_ttl_s": 3, "heartbeat_s": 0.5, "reaper_interval_s": 0.3, "poll_wait_s": 1,
                            "max_attempts": 2, "canary_every": CANARY_EVERY, "canary_recheck_s": 1}
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'farm.db'}"
        upgrade(url)
        with running_server(Settings(database_url=url, artifact_dir=tmp / "artifacts", admin_token=ADMIN,
                                     **fast)) as server:
            yield server
        return
    with temporary_postgres_database(POSTGRES_ADMIN_URL, "latfarm_jobs") as url, running_server(
        Settings(database_url=url, artifact_dir=tmp / "artifacts", admin_token=ADMIN, **fast)
    ) as server:
        yield server


@pytest.fixture
def admin(farm_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{farm_url}/api/v1", headers={"Authorization": f"Bearer {ADMIN}"},
                      timeout=60) as client:
        yield client


def submit(admin: httpx.Client, **body: object) -> httpx.Response:
    return admin.post("/jobs", json={"space": "nb201", "architecture": ARCH, "preset": "quick", **body})


def unique(name: str, tmp_path: Path) -> str:
    return f"{name}-{tmp_path.name[-10:]}"


def test_registration_hands_out_server_intervals_and_one_time_tokens_work_once(admin: httpx.Client,
                                                                                 farm_url: str) -> None:
    token = admin.post("/agents/registration-tokens").json()["token"]
    body = {"name": "once", "capabilities": CAPABILITIES, "devices": [{"name": "once-dev"}]}
    with httpx.Client(base_url=f"{farm_url}/api/v1", headers={"Authorization": f"Bearer {token}"}) as holder:
        first = holder.post("/agents/register", json=body)
        assert first.status_code == 201, first.text
        assert {key: first.json()[key] for key in ("poll_wait_s", "heartbeat_s", "lease_ttl_s")} == {
            "poll_wait_s": 1, "heartbeat_s": 0.5, "lease_ttl_s": 3}
        assert holder.post("/agents/register", json=body).status_code == 401


def test_a_fast_models_short_measurement_is_valid_and_reused_and_an_unstable_one_is_neither(
        admin: httpx.Client, tmp_path: Path) -> None:
    device = unique("flags", tmp_path)
    agent = ScriptedAgent(admin, "flagger", {device: {}})
    agent.pass_canary()
    submit(admin, device=device)
    fast = agent.finish(agent.claim(wait=5), 0.02, [0.02] * 5000)  # the quick preset's run cap in 0.1 s
    assert fast["flags"] == ["short"] and fast["valid"] is True
    again = submit(admin, device=device).json()
    assert again["reused"] and again["measurement_id"] == fast["measurement_id"] and again["valid"] is True
    measurement = admin.get("/measurements", params={"device": device}).json()["items"]
    assert [(m["flags"], m["valid"]) for m in measurement if m["job_id"] == fast["id"]] == [(["short"], True)]

    submit(admin, device=device, force=True)
    noisy = agent.finish(agent.claim(wait=5), 1.2, [1.0, 1.2, 1.4] * 100)
    assert noisy["flags"] == ["unstable"] and noisy["valid"] is False
    # the newer measurement is not reused: the older valid one is
    reused = submit(admin, device=device).json()
    assert reused["reused"] and reused["measurement_id"] == fast["measurement_id"] != noisy["measurement_id"]


def test_selector_picks_a_matching_device_and_422_when_none_can(admin: httpx.Client, tmp_path: Path) -> None:
    one, four = unique("sel-t1", tmp_path), unique("sel-t4", tmp_path)
    agent = ScriptedAgent(admin, "selective", {one: {"threads": 1}, four: {"threads": 4, "board": "orin"}})
    agent.pass_canary()
    agent.pass_canary()
    job = submit(admin, selector=f"threads == 4 and board == orin and name == {four}")
    assert job.status_code == 201, job.text
    assert job.json()["device"] is None and job.json()["queue_position"] == 0
    lease = agent.claim(wait=5)
    assert lease["device"] == four and lease["threads"] == 4
    assert agent.finish(lease)["device"] == four

    never = submit(admin, selector="threads == 4 and board == nowhere")
    assert never.status_code == 422 and "selector" in never.text
    assert submit(admin, selector="threads ==").status_code == 422


def test_valid_measurement_is_reused_unless_forced(admin: httpx.Client, tmp_path: Path) -> None:
    device = unique("dedup", tmp_path)
    agent = ScriptedAgent(admin, "deduper", {device: {}})
    agent.pass_canary()
    first = submit(admin, device=device).json()
    done = agent.finish(agent.claim(wait=5))
    assert done["id"] == first["id"] and done["status"] == "done" and not done["reused"]

    again = submit(admin, device=device).json()
    assert again["status"] == "done" and again["reused"] and again["measurement_id"] == done["measurement_id"]
    other_preset = submit(admin, device=device, preset="standard").json()
    forced = submit(admin, device=device, force=True).json()
    assert other_preset["status"] == forced["status"] == "queued"


def test_queue_position_cancel_and_list_filters(admin: httpx.Client, tmp_path: Path) -> None:
    device = unique("queue", tmp_path)
    ScriptedAgent(admin, "idle", {device: {}})  # registered, never polls: its canary stays queued
    ids = [submit(admin, device=device, architecture=arch, priority=priority).json()["id"]
           for arch, priority in ((ARCH, 0), (OTHER_ARCH, 0), (ARCH, 5))]
    positions = {job_id: admin.get(f"/jobs/{job_id}").json()["queue_position"] for job_id in ids}
    assert positions == {ids[2]: 1, ids[0]: 2, ids[1]: 3}  # behind the canary; priority first, then age

    cancelled = admin.post(f"/jobs/{ids[2]}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["queue_position"] is None
    assert admin.get(f"/jobs/{ids[1]}").json()["queue_position"] == 2
    assert admin.post(f"/jobs/{ids[2]}/cancel").status_code == 409

    listed = admin.get("/jobs", params={"device": device, "status": "cancelled"}).json()["items"]
    assert [job["id"] for job in listed] == [ids[2]]
    assert [job["kind"] for job in admin.get("/jobs", params={"device": device, "kind": "canary"}).json()["items"]] == [
        "canary"]


def test_model_failures_are_results_and_infrastructure_failures_are_retried(admin: httpx.Client,
                                                                             tmp_path: Path) -> None:
    device = unique("retry", tmp_path)
    agent = ScriptedAgent(admin, "flaky", {device: {}})
    agent.pass_canary()
    model_failure = submit(admin, device=device).json()
    failed = agent.fail(agent.claim(wait=5), "unsupported_op")
    assert (failed["id"], failed["status"], failed["attempts"]) == (model_failure["id"], "failed", 1)
    assert failed["failure_class"] == "unsupported_op"

    infra = submit(admin, device=device, architecture=OTHER_ARCH).json()
    requeued = agent.fail(agent.claim(wait=5), "artifact_error")
    assert (requeued["id"], requeued["status"], requeued["attempts"]) == (infra["id"], "queued", 1)
    assert requeued["queue_position"] == 0 and requeued["error"].startswith("attempt 1: artifact_error")
    second = agent.claim(wait=5)
    assert second["job_id"] == infra["id"]
    exhausted = agent.fail(second, "artifact_error")  # max_attempts is 2 here
    assert exhausted["status"] == "failed" and exhausted["attempts"] == 2
    assert exhausted["error"].startswith("gave up after 2 attempts")


def test_a_retried_selector_job_wakes_the_polls_of_every_matching_device(admin: httpx.Client, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Back in the queue, a selector job names no device, so any matching device's poll must wake
    (the polls' own re-check is pushed past the poll here, so only the wake-up can deliver it)."""
    monkeypatch.setattr(agents_api, "RECHECK_S", 60.0)
    pool = unique("pool", tmp_path)
    first, second = (ScriptedAgent(admin, name, {unique(name, tmp_path): {"pool": pool}})
                     for name in ("sel-a", "sel-b"))
    first.pass_canary()
    second.pass_canary()
    job = submit(admin, selector=f"pool == {pool}").json()
    lease = first.claim(wait=5)
    assert lease["job_id"] == job["id"]
    with ThreadPoolExecutor(1) as waiting:
        poll = waiting.submit(second.claim, 10)
        time.sleep(0.5)  # the poll is waiting by then
        failed_at = time.monotonic()
        assert first.fail(lease, "artifact_error")["status"] == "queued"
        taken = poll.result()
    assert taken["job_id"] == job["id"], taken
    assert time.monotonic() - failed_at < 3.0
    assert second.finish(taken)["status"] == "done"  # no lease left to expire in the tests after this one


def test_heartbeat_extends_the_lease_and_carries_cancel(admin: httpx.Client, tmp_path: Path) -> None:
    device = unique("beat", tmp_path)
    agent = ScriptedAgent(admin, "beater", {device: {}})
    agent.pass_canary()
    job = submit(admin, device=device).json()
    lease = agent.claim(wait=5)
    beat = agent.http.post(f"/jobs/{job['id']}/heartbeat", json={"lease_id": lease["lease_id"]}).json()
    assert beat["cancel_requested"] is False and beat["lease_expires_at"] >= lease["lease_expires_at"]
    assert admin.post(f"/jobs/{job['id']}/cancel").json()["status"] == "running"
    beat = agent.http.post(f"/jobs/{job['id']}/heartbeat", json={"lease_id": lease["lease_id"]}).json()
    assert beat["cancel_requested"] is True
    assert agent.fail(lease, "cancelled")["status"] == "cancelled"
    forged = agent.http.post(f"/jobs/{job['id']}/heartbeat", json={"lease_id": "not-the-lease"})
    assert forged.status_code == 409


def test_queue_deadline_and_run_timeout_say_which_fired(admin: httpx.Client, tmp_path: Path) -> None:
    device = unique("deadline", tmp_path)
    agent = ScriptedAgent(admin, "slowpoke", {device: {}})
    agent.pass_canary()
    running = submit(admin, device=device, run_timeout_s=1).json()
    lease = agent.claim(wait=5)
    waiting = submit(admin, device=device, architecture=OTHER_ARCH, queue_deadline_s=1).json()

    def heartbeat_until_finished() -> dict | None:
        agent.http.post(f"/jobs/{lease['job_id']}/heartbeat", json={"lease_id": lease["lease_id"]})
        job = admin.get(f"/jobs/{running['id']}").json()
        return job if job["status"] != "running" else None

    timed_out = wait_until(heartbeat_until_finished, 30)
    assert timed_out["failure_class"] == "run_timeout" and "run timeout fired" in timed_out["error"]
    expired = wait_until(lambda: (j := admin.get(f"/jobs/{waiting['id']}").json())["status"] == "failed" and j, 30)
    assert expired["failure_class"] == "queue_deadline" and "queue deadline fired" in expired["error"]


def test_canary_drift_degrades_the_device_until_a_recheck_passes(admin: httpx.Client, tmp_path: Path) -> None:
    device = unique("drift", tmp_path)
    agent = ScriptedAgent(admin, "drifter", {device: {}})
    agent.pass_canary(10.0)
    assert admin.get(f"/devices/{device}").json()["canary_baseline_ms"] == 10.0
    for arch in (ARCH, OTHER_ARCH)[:CANARY_EVERY]:
        submit(admin, device=device, architecture=arch, force=True)
        agent.finish(agent.claim(wait=5))
    agent.pass_canary(13.0)  # queued after every CANARY_EVERY jobs; 30 % off the baseline
    state = admin.get(f"/devices/{device}").json()
    assert state["state"] == "degraded" and "+30%" in state["state_reason"]

    held = submit(admin, device=device, force=True).json()
    recheck = agent.claim(wait=10)  # a degraded device gets re-check canaries only
    assert recheck["job_id"] != held["id"]
    assert agent.finish(recheck, 10.4)["kind"] == "canary"
    assert admin.get(f"/devices/{device}").json()["state"] == "online"
    resumed = agent.claim(wait=5)
    assert resumed["job_id"] == held["id"]
    agent.finish(resumed)  # no lease left to expire during later tests (metrics count them)


def test_metrics_count_farm_events_and_show_its_state(admin: httpx.Client, farm_url: str, tmp_path: Path) -> None:
    device = unique("metered", tmp_path)
    agent = ScriptedAgent(admin, "metered", {device: {}})
    agent.pass_canary(10.0)
    before = scrape(farm_url)
    abandoned = submit(admin, device=device).json()
    agent.claim(wait=5)  # then silence: the 3 s lease expires and the job is queued again
    wait_until(lambda: admin.get(f"/jobs/{abandoned['id']}").json()["status"] == "queued", 30)
    assert agent.fail(agent.claim(wait=5), "artifact_error")["status"] == "failed"  # max_attempts is 2 here
    flaky = submit(admin, device=device, architecture=OTHER_ARCH).json()
    assert agent.fail(agent.claim(wait=5), "artifact_error")["status"] == "queued"
    assert agent.finish(agent.claim(wait=5), 12.0)["id"] == flaky["id"]
    after = scrape(farm_url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("latfarm_job_retries_total", failure_class="artifact_error") == 1
    assert delta("latfarm_job_retries_total", failure_class="lease_expired") == 1
    assert delta("latfarm_lease_expirations_total") == 1
    assert delta("latfarm_job_wait_seconds_count", kind="measure") == 4
    assert delta("latfarm_job_run_seconds_count", kind="measure", status="done") == 1
    assert after[("latfarm_jobs", (("kind", "canary"), ("status", "done")))] >= 1
    assert ("latfarm_predict_seconds_count", ()) in after
    assert after[("latfarm_devices", (("state", "online"),))] >= 1
    [age] = [value for (name, labels), value in after.items()
             if name == "latfarm_agent_heartbeat_age_seconds" and dict(labels)["agent"].endswith(":metered")]
    assert 0 <= age < 30
    assert after[("latfarm_device_canary_drift_ratio", (("device", device),))] == pytest.approx(0.0)


def test_the_same_result_posted_at_once_is_recorded_once(admin: httpx.Client, tmp_path: Path) -> None:
    """An agent that retries a post its slow server has not answered yet: on SQLite, which locks
    no rows, the copies raced to insert the measurement and the losers got 500."""
    device = unique("repeat", tmp_path)
    agent = ScriptedAgent(admin, "repeater", {device: {}})
    agent.pass_canary()
    stats = {"n": 60, "median_ms": 10.0, "mean_ms": 10.0, "min_ms": 10.0, "max_ms": 10.0, "p90_ms": 10.0,
             "iqr_ms": 0.0, "cv": 0.0}
    for _ in range(5):
        submit(admin, device=device, force=True)
        lease = agent.claim(wait=5)  # that job, or a canary falling due before it
        path = f"/jobs/{lease['job_id']}/result"
        body = {"lease_id": lease["lease_id"], "status": "ok", "stats": stats, "samples_ms": [10.0] * 60}
        with ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(lambda _, path=path, body=body: agent.http.post(path, json=body), range(12)))
        assert [reply.status_code for reply in replies] == [200] * 12, [reply.text for reply in replies]
        recorded = admin.get(f"/jobs/{lease['job_id']}").json()["measurement_id"]
        assert {reply.json()["measurement_id"] for reply in replies} == {recorded}
