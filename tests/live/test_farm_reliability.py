"""The farm under failure, with real processes on a real Postgres: an agent killed mid-job, a
server restarted mid-run, a stale agent posting late, a poll hanging up mid-claim, three agents
sharing one device."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest

from server.api import agents as agents_api
from server.cli.local import free_port, running_agent, running_server, server_process, temporary_postgres_database
from server.settings import Settings
from tests.helpers import CAPABILITIES, POSTGRES_ADMIN_URL, registered, wait_until

pytestmark = pytest.mark.slow

ADMIN = "reliability-admin"
KEYS = [
    "|nor_conv_1x1~0|+|skip_connect~0|nor_conv_3x3~1|+|skip_connect~0|avg_pool_3x3~1|nor_conv_1x1~2|",
    "|nor_conv_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|avg_pool_3x3~0|none~1|nor_conv_3x3~2|",
    "|skip_connect~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_1x1~0|skip_connect~1|avg_pool_3x3~2|",
    "|avg_pool_3x3~0|+|nor_conv_1x1~0|nor_conv_1x1~1|+|nor_conv_3x3~0|avg_pool_3x3~1|skip_connect~2|",
    "|nor_conv_1x1~0|+|nor_conv_1x1~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|",
    "|nor_conv_3x3~0|+|skip_connect~0|avg_pool_3x3~1|+|nor_conv_1x1~0|nor_conv_1x1~1|nor_conv_3x3~2|",
]
FAST = {"LATFARM_LEASE_TTL_S": "3", "LATFARM_HEARTBEAT_S": "0.5", "LATFARM_REAPER_INTERVAL_S": "0.5",
        "LATFARM_POLL_WAIT_S": "1", "LATFARM_CANARY_EVERY": "0",
        # a shared CI host drifts: these tests are about leases, not about degrading the device
        "LATFARM_CANARY_DRIFT": "10"}


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with temporary_postgres_database(POSTGRES_ADMIN_URL, "latfarm_rel") as url:
        yield url


def fast_settings(url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=url, artifact_dir=tmp_path / "artifacts", admin_token=ADMIN,
                    **{key.removeprefix("LATFARM_").lower(): float(value) for key, value in FAST.items()})


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)


def submit(api: httpx.Client, device: str, keys: list[str], preset: str = "quick") -> list[int]:
    ids = []
    for key in keys:
        response = api.post("/jobs", json={"device": device, "space": "nb201", "architecture": key, "preset": preset})
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


def all_finished(api: httpx.Client, ids: list[int]) -> list[dict] | None:
    jobs = [api.get(f"/jobs/{job_id}").json() for job_id in ids]
    return jobs if all(job["status"] in ("done", "failed", "cancelled") for job in jobs) else None


def canary_done(api: httpx.Client, device: str) -> bool:
    response = api.get("/jobs", params={"device": device, "kind": "canary"})
    canaries = response.json()["items"] if response.status_code == 200 else []
    return bool(canaries) and all(job["status"] == "done" for job in canaries)


def measurements_per_job(url: str) -> dict[int, int]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT job_id, count(*) FROM measurements GROUP BY job_id").fetchall())


def test_agent_killed_mid_job_is_replaced(postgres_url: str, tmp_path: Path) -> None:
    settings = fast_settings(postgres_url, tmp_path)
    device = "shared-cpu"
    with running_server(settings) as url, client(url) as api:
        (tmp_path / "a").mkdir()
        with running_agent(url, ADMIN, device, 1, tmp_path / "a", ["--name", "doomed"]) as doomed:
            wait_until(lambda: canary_done(api, device), 120)
            [job_id] = submit(api, device, KEYS[:1], preset="rigorous")  # >= 3 s of timed runs
            wait_until(lambda: api.get(f"/jobs/{job_id}").json()["status"] == "running", 60)
            doomed.send_signal(signal.SIGKILL)
            doomed.wait()
        (tmp_path / "b").mkdir()
        with running_agent(url, ADMIN, device, 1, tmp_path / "b", ["--name", "rescuer"]):
            done = wait_until(lambda: all_finished(api, [job_id]), 180)[0]
    assert done["status"] == "done", done
    assert done["attempts"] == 2 and "lease expired" in (done["error"] or "")
    assert measurements_per_job(postgres_url)[job_id] == 1


def test_server_restart_mid_run_loses_nothing(postgres_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {"LATFARM_DATABASE_URL": postgres_url, "LATFARM_ADMIN_TOKEN": ADMIN,
           "LATFARM_ARTIFACT_DIR": str(tmp_path / "artifacts"), **FAST}
    url = f"http://127.0.0.1:{port}"
    device = "restart-cpu"
    with server_process(env, port, log=tmp_path / "server1.log") as first, client(url) as api:
        agent_dir = tmp_path / "agent"
        agent_dir.mkdir()
        with running_agent(url, ADMIN, device, 1, agent_dir):
            wait_until(lambda: canary_done(api, device), 120)
            ids = submit(api, device, KEYS)
            wait_until(lambda: sum(api.get(f"/jobs/{i}").json()["status"] == "done" for i in ids) >= 2, 120)
            first.send_signal(signal.SIGKILL)
            first.wait()
            time.sleep(2)  # the agent meets a dead server: polls, heartbeats and results fail
            with server_process(env, port, log=tmp_path / "server2.log"):
                jobs = wait_until(lambda: all_finished(api, ids), 240)
    assert [job["status"] for job in jobs] == ["done"] * len(KEYS), jobs
    counts = measurements_per_job(postgres_url)
    assert all(counts[job_id] == 1 for job_id in ids)


def test_stale_lease_gets_409(postgres_url: str, tmp_path: Path) -> None:
    settings = fast_settings(postgres_url, tmp_path)
    with running_server(settings) as url, client(url) as api:
        api.post("/devices", json={"name": "manual-dev"})
        tokens = []
        for name in ("slow", "other"):
            reply = api.post("/agents/register", json={"name": name, "devices": [{"name": "manual-dev"}],
                                                       "capabilities": CAPABILITIES})
            tokens.append({"Authorization": f"Bearer {reply.json()['agent_token']}"})
        slow, other = tokens
        canary = api.get("/agents/me/jobs/next", params={"wait": "5"}, headers=slow).json()
        [job_id] = submit(api, "manual-dev", KEYS[:1])
        stats = {"n": 30, "median_ms": 1.0, "mean_ms": 1.0, "min_ms": 1.0, "max_ms": 1.0, "p90_ms": 1.0,
                 "iqr_ms": 0.0, "cv": 0.0}
        # another agent of the device may not post for a lease it does not hold
        forged = api.post(f"/jobs/{canary['job_id']}/result", headers=other,
                          json={"lease_id": canary["lease_id"], "status": "ok", "stats": stats})
        assert forged.status_code == 403, forged.text
        time.sleep(5)  # past the 3 s lease: the reaper re-queues the canary
        late = api.post(f"/jobs/{canary['job_id']}/result", headers=slow,
                        json={"lease_id": canary["lease_id"], "status": "ok", "stats": stats})
        assert late.status_code == 409 and "stale" in late.json()["detail"]
        assert api.post(f"/jobs/{canary['job_id']}/heartbeat", headers=slow,
                        json={"lease_id": canary["lease_id"]}).status_code == 409
        # the re-leased job takes a fresh lease, and its result is accepted once, idempotently
        again = api.get("/agents/me/jobs/next", params={"wait": "5"}, headers=other).json()
        assert again["job_id"] == canary["job_id"] and again["lease_id"] != canary["lease_id"]
        body = {"lease_id": again["lease_id"], "status": "ok", "stats": stats, "samples_ms": [1.0] * 30}
        first = api.post(f"/jobs/{again['job_id']}/result", headers=other, json=body)
        second = api.post(f"/jobs/{again['job_id']}/result", headers=other, json=body)
        assert first.status_code == second.status_code == 200 and first.json() == second.json()
        assert api.get(f"/jobs/{job_id}").json()["status"] == "queued"
    assert measurements_per_job(postgres_url)[canary["job_id"]] == 1


def test_three_agents_never_run_two_jobs_on_one_device(postgres_url: str, tmp_path: Path) -> None:
    settings = fast_settings(postgres_url, tmp_path)
    device = "contended-cpu"
    with running_server(settings) as url, client(url) as api:
        dirs = [tmp_path / f"agent{i}" for i in range(3)]
        for folder in dirs:
            folder.mkdir()
        # an agent finishing a job is handed the device's next one, so each stops after 6 jobs: no
        # one agent can run all 12 (and the canaries), and the device changes hands under contention
        limit = ["--max-jobs", "6"]
        with running_agent(url, ADMIN, device, 1, dirs[0], ["--name", "a0", *limit]) as a0, \
                running_agent(url, ADMIN, device, 1, dirs[1], ["--name", "a1", *limit]) as a1, \
                running_agent(url, ADMIN, device, 1, dirs[2], ["--name", "a2", *limit]) as a2:
            agents = [a0, a1, a2]
            wait_until(lambda: len((registered(api, device) or {}).get("agents", [])) == 3, 60)
            ids = submit(api, device, KEYS * 2)
            jobs = wait_until(lambda: all_finished(api, ids), 300)
            assert all(agent.poll() in (None, 0) for agent in agents)
    assert all(job["status"] == "done" for job in jobs), jobs
    with psycopg.connect(postgres_url) as conn:
        spans = conn.execute(
            "SELECT started_at, finished_at, agent_id FROM jobs WHERE started_at IS NOT NULL ORDER BY started_at"
        ).fetchall()
    for (_, finished, _), (started, _, _) in zip(spans, spans[1:]):
        assert started >= finished, "two jobs ran on the device at once"
    assert len({agent for *_, agent in spans}) >= 2, "only one agent ever got work"


def test_a_hundred_agents_register_at_once(postgres_url: str, tmp_path: Path) -> None:
    """Concurrent registrations contend for the same new rows; none may starve the others (before
    the worker threads were sized to the requests, 100 of them deadlocked until the pool timed out)."""
    settings = fast_settings(postgres_url, tmp_path)

    async def register_all(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {ADMIN}"},
                                     limits=httpx.Limits(max_connections=100), timeout=60) as http:
            replies = await asyncio.gather(*(
                http.post("/agents/register", json={"name": f"burst-{i}", "devices": [{"name": f"burst-{i % 50}"}],
                                                    "capabilities": CAPABILITIES})
                for i in range(100)))
        return [reply.status_code for reply in replies]

    with running_server(settings) as url, client(url) as api:
        started = time.monotonic()
        codes = asyncio.run(register_all(url))
        elapsed = time.monotonic() - started
        canaries = api.get("/jobs", params={"kind": "canary", "limit": 1000}).json()["items"]
    assert codes == [201] * 100
    assert elapsed < 25, f"100 registrations took {elapsed:.0f} s"
    assert len(canaries) == 50  # one per device: the second agent's registration found it queued


def test_notify_wakes_a_long_poll_served_by_another_server(postgres_url: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A job submitted through one server process reaches an agent long-polling another at once:
    the NOTIFY carries it (the fallback re-check is pushed past the poll here, so only it can)."""
    monkeypatch.setattr(agents_api, "RECHECK_S", 60.0)
    settings = fast_settings(postgres_url, tmp_path)
    with running_server(settings) as polled_url, running_server(settings) as submit_url, \
            client(polled_url) as polled, client(submit_url) as submitting:
        polled.post("/devices", json={"name": "notify-dev"})
        reply = polled.post("/agents/register", json={"name": "listener", "devices": [{"name": "notify-dev"}],
                                                      "capabilities": CAPABILITIES}).json()
        agent = {"Authorization": f"Bearer {reply['agent_token']}"}
        canary = polled.get("/agents/me/jobs/next", params={"wait": "5"}, headers=agent).json()
        polled.post(f"/jobs/{canary['job_id']}/result", headers=agent,
                    json={"lease_id": canary["lease_id"], "status": "failed", "failure_class": "load_error"})

        def submit_soon() -> float:
            time.sleep(1.0)  # the poll is waiting by then
            submit(submitting, "notify-dev", KEYS[:1])
            return time.monotonic()

        with ThreadPoolExecutor(1) as pool:
            submitted = pool.submit(submit_soon)
            lease = polled.get("/agents/me/jobs/next", params={"wait": "20"}, headers=agent)
            latency = time.monotonic() - submitted.result()
    assert lease.status_code == 200, lease.text
    assert latency < 3.0, f"the poll took {latency:.1f} s to see a job submitted elsewhere"


def test_a_lease_claimed_for_a_poll_that_hung_up_goes_back_to_the_queue(postgres_url: str, tmp_path: Path) -> None:
    """The agent gives up on its long poll while the poll's claim waits on a lock; the lease the
    claim then takes goes back to the queue at once, its attempt uncounted (not after 60 s)."""
    settings = fast_settings(postgres_url, tmp_path).model_copy(update={"lease_ttl_s": 60.0})
    with running_server(settings) as url, client(url) as api, psycopg.connect(postgres_url) as blocker, \
            psycopg.connect(postgres_url, autocommit=True) as observer:
        api.post("/devices", json={"name": "hangup-dev"})
        reply = api.post("/agents/register", json={"name": "hangs-up", "devices": [{"name": "hangup-dev"}],
                                                   "capabilities": CAPABILITIES}).json()
        agent = {"Authorization": f"Bearer {reply['agent_token']}"}
        canary = api.get("/agents/me/jobs/next", params={"wait": "5"}, headers=agent).json()
        assert api.post(f"/jobs/{canary['job_id']}/result", headers=agent, json=ok_result(canary)).status_code == 200
        [job_id] = submit(api, "hangup-dev", KEYS[:1])

        def claims_waiting() -> int:
            return observer.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                   " AND query LIKE 'WITH named%'").fetchone()[0]  # type: ignore[index]

        blocker.execute("LOCK TABLE jobs IN EXCLUSIVE MODE")  # a claim's FOR UPDATE waits for it
        with ThreadPoolExecutor(1) as pool:
            poll = pool.submit(api.get, "/agents/me/jobs/next", params={"wait": "0"}, headers=agent, timeout=2)
            wait_until(claims_waiting, 10)
            with pytest.raises(httpx.ReadTimeout):
                poll.result()  # the agent hung up
        blocker.commit()
        wait_until(lambda: claims_waiting() == 0, 10)
        # the claim went on and leased the job; handed back, it wakes this poll
        lease = api.get("/agents/me/jobs/next", params={"wait": "10"}, headers=agent)
        assert lease.status_code == 200 and lease.json()["job_id"] == job_id, lease.text
        job = api.get(f"/jobs/{job_id}").json()
        assert job["attempts"] == 1 and job["error"] is None, job


def ok_result(lease: dict) -> dict:
    stats = {"n": 30, "median_ms": 1.0, "mean_ms": 1.0, "min_ms": 1.0, "max_ms": 1.0, "p90_ms": 1.0,
             "iqr_ms": 0.0, "cv": 0.0}
    return {"lease_id": lease["lease_id"], "status": "ok", "stats": stats, "samples_ms": [1.0] * 30}
