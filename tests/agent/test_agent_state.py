"""The agent's persistent state (stored credentials, the outbox of unacknowledged results) and its
randomised waits, against the fake farm of tests/helpers.py over real HTTP, with real workers and
a real agent process."""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.backoff import full_jitter, jittered
from agent.client import AuthError, ServerClient
from agent.protocol import JobResult, ResultStatus
from agent.state import AgentState, Credentials, StateInUse
from agent.worker import BACKOFF_MAX_S, Worker
from tests.helpers import (
    FAST,
    FakeFarm,
    LocalServer,
    UpperBoundRng,
    agent_settings,
    fast_client,
    start_agent_cli,
    wait_for,
)

Farm = Callable[[], tuple[FakeFarm, LocalServer]]


class CappedRng(random.Random):
    """An RNG whose `uniform` returns at most `cap`: backoff delays stay short and known."""

    def __init__(self, cap: float) -> None:
        super().__init__(0)
        self.cap = cap

    def uniform(self, a: float, b: float) -> float:
        return min(b, max(a, self.cap))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _failed_result(job_id: int) -> JobResult:
    return JobResult(lease_id=f"lease-{job_id}", status=ResultStatus.failed, error="boom",
                     failure_class="runtime_error")


# ------------------------------------------------------------------------------------- backoff


def test_full_jitter_and_jittered_stay_in_their_ranges() -> None:
    top = UpperBoundRng()
    assert [full_jitter(n, 0.5, 10.0, top) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]
    assert full_jitter(100_000, 0.5, 10.0, top) == 10.0  # no overflow, however many failures
    rng = random.Random(1)
    delays = [full_jitter(4, 1.0, 60.0, rng) for _ in range(200)]
    assert all(0 <= d <= 16.0 for d in delays) and len(set(delays)) == 200  # spread, not one value
    waits = [jittered(30.0, 0.1, rng) for _ in range(200)]
    assert all(27.0 <= w <= 33.0 for w in waits) and min(waits) < 28.5 and max(waits) > 31.5


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there now: connections are refused


def test_registration_backs_off_exponentially_while_the_server_is_down(tmp_path: Path) -> None:
    delays: list[float] = []

    def wait(delay: float) -> bool:
        delays.append(delay)
        return len(delays) == 7  # then ask the worker to stop

    settings = agent_settings(_closed_port_url(), tmp_path)
    client = ServerClient(settings.server, settings.token, max_attempts=1)
    worker = Worker(settings, client=client, rng=UpperBoundRng(), wait=wait)
    assert worker.run(install_signal_handlers=False) == 0
    assert delays == [2.0, 4.0, 8.0, 16.0, 32.0, BACKOFF_MAX_S, BACKOFF_MAX_S]
    assert not (tmp_path / "state" / "credentials.json").exists()

    delays.clear()
    settings = agent_settings(_closed_port_url(), tmp_path)
    worker = Worker(settings, client=ServerClient(settings.server, settings.token, max_attempts=1),
                    rng=random.Random(5), wait=wait)
    assert worker.run(install_signal_handlers=False) == 0
    ceilings = [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings)) and delays != ceilings


def test_poll_failures_back_off_and_poll_wait_is_jittered(farm: Farm, tmp_path: Path) -> None:
    fake, server = farm()
    fake.fail_next_polls = 3
    delays: list[float] = []

    def wait(delay: float) -> bool:
        delays.append(delay)
        return False

    settings = agent_settings(server.url, tmp_path, poll_wait_s=0.5)
    worker = Worker(settings, client=fast_client(settings, max_attempts=1), rng=UpperBoundRng(), wait=wait)
    assert worker.run(install_signal_handlers=False) == 0
    assert delays == [2.0, 4.0, 8.0]  # three failed polls; the fourth got its 204
    assert fake.polls == [0.55] * 4  # 0.5 s + 10 %, the widest jitter

    fake2, server2 = farm()
    settings = agent_settings(server2.url, tmp_path / "2", poll_wait_s=0.5)
    assert Worker(settings, rng=random.Random(3)).run(install_signal_handlers=False) == 0
    (asked,) = fake2.polls
    assert asked == pytest.approx(0.5 * random.Random(3).uniform(0.9, 1.1), rel=1e-5) and asked != 0.5


# --------------------------------------------------------------------------------- credentials


def test_registration_stores_credentials_and_presents_them_again(farm: Farm, tmp_path: Path) -> None:
    fake, server = farm()
    settings = agent_settings(server.url, tmp_path)
    creds_path = tmp_path / "state" / "credentials.json"

    assert Worker(settings).run(install_signal_handlers=False) == 0
    stored = json.loads(creds_path.read_text())
    assert stored == {"server": server.url, "agent_id": 7, "agent_token": FakeFarm.AGENT_TOKEN}
    assert _mode(creds_path) == 0o600
    assert sorted(p.name for p in creds_path.parent.iterdir()) == ["agent.lock", "credentials.json"]  # no temp files
    assert fake.registrations[-1]["_token"] == FakeFarm.REG_TOKEN

    # A restart presents the stored agent token and comes back as the same agent.
    worker = Worker(settings)
    assert worker.run(install_signal_handlers=False) == 0
    assert fake.registrations[-1]["_token"] == FakeFarm.AGENT_TOKEN
    assert worker.registration is not None and worker.registration.agent_id == 7
    assert fake.agents == {FakeFarm.AGENT_TOKEN: 7}  # no second agent

    # The server forgot the agent: the stored token gets a 401, the registration token is used.
    fake.agents = {"someone-else": 99}
    worker = Worker(settings)
    assert worker.run(install_signal_handlers=False) == 0
    assert fake.registrations[-1]["_token"] == FakeFarm.REG_TOKEN
    assert worker.registration is not None and worker.registration.agent_id == 8
    assert json.loads(creds_path.read_text())["agent_token"] == f"{FakeFarm.AGENT_TOKEN}-8"


def test_credentials_of_another_server_or_unreadable_are_not_used(farm: Farm, tmp_path: Path) -> None:
    fake, server = farm()
    settings = agent_settings(server.url, tmp_path)
    state = AgentState(settings.state_dir)
    state.save_credentials(Credentials(server="http://elsewhere:8000", agent_id=1, agent_token=FakeFarm.AGENT_TOKEN))
    assert state.load_credentials("http://elsewhere:8000") is not None
    assert state.load_credentials(server.url) is None
    fake.agents[FakeFarm.AGENT_TOKEN] = 1  # would be accepted, were it presented
    assert Worker(settings).run(install_signal_handlers=False) == 0
    assert [r["_token"] for r in fake.registrations] == [FakeFarm.REG_TOKEN]
    assert json.loads(state.credentials_path.read_text())["server"] == server.url  # replaced

    state.credentials_path.write_text("{not json")
    assert state.load_credentials(server.url) is None
    assert Worker(settings).run(install_signal_handlers=False) == 0
    assert fake.registrations[-1]["_token"] == FakeFarm.REG_TOKEN


# -------------------------------------------------------------------------------------- outbox


def test_result_kept_while_server_is_down_is_sent_by_a_new_agent_process(farm: Farm, tmp_path: Path) -> None:
    fake, server = farm()
    sha = next(iter(fake.artifacts))
    fake.add_job(1, sha, FAST, "testhost-ort-1t-b1")
    fake.results_down = True

    settings = agent_settings(server.url, tmp_path, max_jobs=1, exit_when_idle=False)
    worker = Worker(settings, client=fast_client(settings, max_attempts=2))
    assert worker.run(install_signal_handlers=False) == 0
    assert worker.jobs_done == 1 and fake.results == {} and fake.result_posts == 2  # both attempts got 503

    outbox_file = tmp_path / "state" / "outbox" / "1.json"
    kept = json.loads(outbox_file.read_text())
    assert kept["job_id"] == 1 and kept["server"] == server.url
    result = JobResult.model_validate(kept["result"])
    assert result.lease_id == "lease-1" and result.status is ResultStatus.ok and result.stats is not None
    assert _mode(outbox_file) == 0o600

    # The server is back; a new agent process (same state directory) sends the result first thing.
    fake.results_down = False
    fake.requests.clear()
    proc = start_agent_cli(server, tmp_path, "--exit-when-idle", "--poll-wait", "0")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert fake.results[1] == kept["result"]
    assert not outbox_file.exists()
    assert fake.requests[:3] == ["POST /api/v1/agents/register", "POST /api/v1/jobs/1/result",
                                 "GET /api/v1/agents/me/jobs/next"]
    assert fake.registrations[-1]["_token"] == FakeFarm.AGENT_TOKEN  # re-registered with the stored token
    assert "re-sending its result from the outbox" in out


def test_outbox_is_retried_with_backoff_while_the_agent_keeps_polling(farm: Farm, tmp_path: Path) -> None:
    fake, server = farm()
    fake.add_job(1, next(iter(fake.artifacts)), FAST, "testhost-ort-1t-b1")
    fake.results_down = True
    settings = agent_settings(server.url, tmp_path, exit_when_idle=False)
    worker = Worker(settings, client=fast_client(settings, max_attempts=1), rng=CappedRng(0.3))

    # Backoff: right after a failed post the outbox is not re-sent; once the delay passed, it is.
    thread_result: list[int] = []
    runner = threading.Thread(
        target=lambda: thread_result.append(worker.run(install_signal_handlers=False)), daemon=True
    )
    runner.start()
    try:
        wait_for(lambda: fake.result_posts >= 1)  # the job ran; its result met the outage
        posts_after_job = fake.result_posts
        polls_after_job = len(fake.polls)
        wait_for(lambda: fake.result_posts >= posts_after_job + 2)  # re-sent again and again...
        assert len(fake.polls) > polls_after_job  # ...while the agent kept polling for jobs
        fake.results_down = False
        wait_for(lambda: 1 in fake.results)
        wait_for(lambda: not (tmp_path / "state" / "outbox" / "1.json").exists())
    finally:
        worker.request_stop()
        runner.join(timeout=30)
    assert thread_result == [0]
    assert JobResult.model_validate(fake.results[1]).status is ResultStatus.ok


def test_flush_outbox_waits_for_its_backoff(farm: Farm, tmp_path: Path) -> None:
    fake, server = farm()
    settings = agent_settings(server.url, tmp_path)
    worker = Worker(settings, client=fast_client(settings, max_attempts=1), rng=CappedRng(0.3))
    worker.register()
    worker.state.outbox_put(server.url, 5, _failed_result(5))
    fake.results_down = True
    worker.flush_outbox()
    assert fake.result_posts == 1
    worker.flush_outbox()  # within the 0.3 s backoff: not sent
    assert fake.result_posts == 1
    time.sleep(0.35)
    fake.results_down = False
    worker.flush_outbox()
    assert fake.result_posts == 2 and fake.results[5]["lease_id"] == "lease-5"
    assert worker.state.outbox_entries(server.url) == []
    worker.client.close()


def test_outbox_drops_results_refused_for_good_and_keeps_the_rest(farm: Farm, tmp_path: Path) -> None:
    fake, server = farm()
    settings = agent_settings(server.url, tmp_path)
    worker = Worker(settings, client=fast_client(settings))
    worker.register()
    state = worker.state
    fake.stale.add(21)  # 409: stale lease
    fake.refuse_results.update({22: 404, 23: 403, 26: 401})
    for job_id in (21, 22, 23, 25, 26):
        state.outbox_put(server.url, job_id, _failed_result(job_id))
    state.outbox_put("http://elsewhere:8000", 30, _failed_result(30))  # another server's job 30
    corrupt = state.outbox_dir / "31.json"
    corrupt.write_text("{half a json")

    with pytest.raises(AuthError):  # 401: the agent token was refused; the caller registers again
        worker.flush_outbox()
    left = sorted(p.name for p in state.outbox_dir.iterdir())
    assert left == ["26.json", "30.json", "31.json.corrupt"]
    assert set(fake.results) == {25}  # accepted; 21, 22, 23 refused for good and dropped
    assert fake.result_posts == 5  # never job 30: it belongs to another server
    assert [e.job_id for e in state.outbox_entries(server.url)] == [26]
    worker.client.close()


def test_outbox_files_are_written_atomically(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "state")
    result = _failed_result(3)
    state.outbox_put("http://farm", 3, result)
    state.outbox_put("http://farm", 3, result.model_copy(update={"error": "second"}))  # replaced whole
    (entry,) = state.outbox_entries("http://farm")
    assert entry.job_id == 3 and entry.result.error == "second"
    assert [p.name for p in state.outbox_dir.iterdir()] == ["3.json"] and _mode(state.outbox_dir / "3.json") == 0o600
    state.outbox_remove(3)
    state.outbox_remove(3)  # already gone: fine
    assert state.outbox_entries("http://farm") == []


@pytest.mark.skipif(os.name != "posix", reason="advisory locks (fcntl)")
def test_two_agents_cannot_share_a_state_directory(farm: Farm, tmp_path: Path) -> None:
    fake, server = farm()
    state = AgentState(tmp_path / "state")
    with state.locked():  # an agent is running with this state directory
        proc = start_agent_cli(server, tmp_path, "--exit-when-idle", "--poll-wait", "0")
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 1, out
        assert f"in use by another agent (pid {os.getpid()})" in out and "--state-dir" in out
        with pytest.raises(StateInUse):
            with AgentState(tmp_path / "state").locked():
                pass
    assert fake.registrations == []
    # Once it stopped, the directory is free again.
    assert Worker(agent_settings(server.url, tmp_path)).run(install_signal_handlers=False) == 0
    assert len(fake.registrations) == 1
