"""Onboarding a new device end to end: a real agent measures sampler-chosen (and then uncertain)
architectures, a training worker adapts the base predictor, the registry records it, `/predict`
serves it, new measurements re-adapt it and a canary drift marks it stale. On SQLite the server's
own worker trains; on Postgres a separate `latfarm worker` process does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from predictor import LatencyPredictor
from predictor.bench.data import load_space_table
from predictor.spaces import get_space
from server.cli.local import running_agent
from server.db import make_engine, make_session_factory, session_scope
from server.models import (
    Device,
    Job,
    JobKind,
    JobStatus,
    Predictor,
    PredictorKind,
    PredictorStatus,
    utcnow,
)
from server.services import health
from server.services.catalog import space_row
from server.services.onboarding import REMEASUREMENTS
from server.settings import Settings
from tests.helpers import ADMIN_TOKEN, DATASETS, ScriptedAgent, onboarding_jobs, pretrained, registered, wait_until

pytestmark = pytest.mark.slow
#: measured before onboarding: what the adapted predictor is validated on
VALIDATION_ARCHS = 8


def _finished(api: httpx.Client, onboarding_id: int) -> dict[str, Any] | None:
    onboarding = api.get(f"/onboardings/{onboarding_id}").json()
    return onboarding if onboarding["status"] in ("ready", "failed") else None


def test_a_new_device_is_onboarded_with_20_samples_and_served(imported: Settings, server_url: str,
                                                             api: httpx.Client, tmp_path: Path) -> None:
    base = pretrained(api)
    device = f"onboard-e2e-{tmp_path.name[-8:]}"
    with running_agent(server_url, ADMIN_TOKEN, device, 1, tmp_path, ["--poll-wait", "1"]):
        wait_until(lambda: registered(api, device), 60)
        extra = api.get("/architectures", params={"space": "nb201", "limit": VALIDATION_ARCHS, "cursor": 5000}).json()
        extra_keys = [a["key"] for a in extra["items"]]
        checks = [api.post("/jobs", json={"device": device, "space": "nb201", "architecture": key, "preset": "quick"})
                  .json()["id"] for key in extra_keys]
        wait_until(lambda: all(api.get(f"/jobs/{i}").json()["status"] == "done" for i in checks), 120)

        started = time.perf_counter()
        onboarding = api.post(f"/devices/{device}/onboard", json={"space": "nb201", "samples": 20, "preset": "quick"})
        assert onboarding.status_code == 202, onboarding.text
        final = wait_until(lambda: _finished(api, onboarding.json()["id"]), 300, 0.5)
        onboard_s = time.perf_counter() - started
        print(f"onboarding 20 samples (quick preset): {onboard_s:.1f} s")
        assert final["status"] == "ready", final
        # a sample the fit finds suspect, or the agent did not trust, is measured twice more
        assert final["jobs_total"] == onboarding_jobs(20, final["rounds"]) and final["jobs_done"] == final["jobs_total"]
        assert onboard_s < 120

        adapted = api.get(f"/predictors/{final['predictor_id']}").json()
        assert adapted["kind"] == "adapted" and adapted["status"] == "ready" and adapted["device"] == device
        assert adapted["parent_id"] == base["id"] and adapted["version"] == len(final["rounds"])  # one per round
        assert 2 <= adapted["metrics"]["samples"] <= 20
        assert adapted["data_snapshot"]["measurements"] == adapted["metrics"]["samples"]
        assert adapted["data_snapshot"]["first_measured_at"] <= adapted["data_snapshot"]["last_measured_at"]
        # validated on the extra measurements held out, or else by cross-validation over the
        # samples; a noisy host flags measurements, and flagged ones are neither
        # (the registration canary is a held-out measurement too)
        canaries = api.get("/jobs", params={"device": device, "kind": "canary"}).json()["items"]
        held_out = len({job["architecture"] for job in [*(api.get(f"/jobs/{i}").json() for i in checks), *canaries]
                        if job["status"] == "done" and job["valid"]})  # one per architecture: its median
        metrics = adapted["metrics"]
        print(f"valid held-out measurements: {held_out}; samples trained on: {metrics['samples']}; "
              f"validation: { {k: v for k, v in metrics.get('validation', {}).items() if k != 'points'} }")
        if held_out >= 5:
            validation = metrics["validation"]
            assert validation["method"] == "held-out" and validation["n"] == held_out
            assert [point["samples"] for point in metrics["curve"]][-1] == metrics["samples"]
        elif metrics["samples"] >= 10:
            validation = metrics["validation"]
            assert validation["method"] == "5-fold" and validation["n"] == metrics["samples"]
        else:
            assert "validation" not in metrics
            validation = None
        if validation is not None:
            assert len(validation["points"]) == validation["n"] and validation["mape"] >= 0
            assert validation["spearman"] is None or -1 <= validation["spearman"] <= 1

        served = api.post("/predict", json={"device": device, "space": "nb201", "architectures": extra_keys}).json()
        assert served["predictor_id"] == adapted["id"] and served["predictor_version"] == adapted["version"]
        assert served["predictor_status"] == "ready" and all(ms > 0 for ms in served["latency_ms"])

        explained = api.get(f"/devices/{device}/explain", params={"space": "nb201"}).json()
        assert explained["predictor_id"] == adapted["id"]
        assert {r["device"] for r in explained["resembles"]} == set(base["training_devices"])
        assert {c["op"] for c in explained["op_costs"]} >= {"nor_conv_3x3", "skip_connect"}
        assert min(c["effect_pct"] for c in explained["op_costs"]) == 0
        command = subprocess.run([sys.executable, "-m", "server.cli", "explain", device, "--json"], capture_output=True,
                                 text=True, env={**os.environ, "LATFARM_DATABASE_URL": imported.database_url})
        assert command.returncode == 0, command.stderr
        assert json.loads(command.stdout)["predictor_id"] == adapted["id"]

        # new valid measurements re-adapt the predictor (after the debounce): version 2 is served
        fresh = [a["key"] for a in api.get("/architectures", params={"space": "nb201", "limit": 5,
                                                                     "cursor": 9000}).json()["items"]]
        jobs = [api.post("/jobs", json={"device": device, "space": "nb201", "architecture": key, "preset": "quick",
                                        "force": True}).json()["id"] for key in fresh]
        done = wait_until(lambda: all((js := [api.get(f"/jobs/{i}").json() for i in jobs])[k]["status"] == "done"
                                      for k in range(len(jobs))) and js, 120)
    valid = sum(job["valid"] for job in done)
    if not valid:
        pytest.skip("re-adaptation follows valid measurements; this host flagged all 5 unstable or drift")
    def readapted_on_them() -> Any:
        # measurements arriving a moment apart may make two re-adaptations: wait for one that has them all
        served = api.post("/predict", json={"device": device, "space": "nb201", "architectures": fresh}).json()
        row = api.get(f"/predictors/{served['predictor_id']}").json()
        # a measurement's time is its transaction's start (a second's resolution on SQLite)
        newest = max(datetime.fromisoformat(job["finished_at"]) for job in done if not job["flags"])
        last = datetime.fromisoformat(row["data_snapshot"]["last_measured_at"])
        return served["predictor_version"] >= 2 and last >= newest - timedelta(seconds=1) and row

    readapted = wait_until(readapted_on_them, 60)
    assert readapted["parent_id"] == base["id"] and readapted["status"] == "ready"
    assert readapted["metrics"]["samples"] >= valid


def test_active_learning_measures_the_least_certain_architectures_up_to_the_budget(
        imported: Settings, server_url: str, api: httpx.Client, tmp_path: Path) -> None:
    pretrained(api)
    device = f"onboard-active-{tmp_path.name[-8:]}"
    with running_agent(server_url, ADMIN_TOKEN, device, 1, tmp_path, ["--poll-wait", "1"]):
        wait_until(lambda: registered(api, device), 60)
        onboarding = api.post(f"/devices/{device}/onboard", json={
            "space": "nb201", "samples": 5, "preset": "quick", "budget": 10, "target_uncertainty": 1e-6,
        })
        assert onboarding.status_code == 202, onboarding.text
        final = wait_until(lambda: _finished(api, onboarding.json()["id"]), 300, 0.5)
    assert final["status"] == "ready", final
    rounds = final["rounds"]
    # a sample the fit finds suspect, or the agent did not trust, is measured twice more (not
    # counted in the budget)
    assert final["jobs_total"] == onboarding_jobs(10, rounds) and final["budget"] == 10
    # (a round that re-measures keeps its count of samples)
    samples = [r["samples"] for r in rounds]
    assert samples == sorted(samples) and set(samples) == {5, 10}
    assert rounds[-1]["predictor_id"] == final["predictor_id"]
    jobs = api.get("/jobs", params={"onboarding": final["id"]}).json()["items"]
    in_order = list(dict.fromkeys(j["architecture"] for j in jobs))
    first, second = set(in_order[:5]), set(in_order[5:10])
    assert len(first | second) == 10  # the second round measured new architectures
    assert len({get_space("nb201").network_key(key) for key in first | second}) == 10  # and new networks


def _onboard_with_one_bad_first_answer(api: httpx.Client, imported: Settings, device: str,
                                       first_answer: Callable[[float], dict[str, Any]],
                                       ) -> tuple[float | None, float | None, float]:
    """Onboard `device` (20 NB201 samples) through a scripted agent that answers with pixel3's
    latencies (its table runs the built network: one latency per network), except the first
    measurement of one sampled architecture, the victim, which it answers with
    `first_answer(true ms)` (`ScriptedAgent.finish`'s keyword arguments). Checks that the victim
    was measured twice more, and returns what each of the first and last rounds' predictors
    trained on for it (None: not at all), with its true latency."""
    pretrained(api)
    space = get_space("nb201")
    table = load_space_table(DATASETS, "nb201")
    by_network = {space.network_key(key): ms for key, ms in table.device_truth("pixel3").items()}

    def truth(key: str) -> float:
        return by_network[space.network_key(key)]

    agent = ScriptedAgent(api, "remeasurer", {device: {}})
    onboarding = api.post(f"/devices/{device}/onboard", json={"space": "nb201", "samples": 20, "preset": "quick"})
    assert onboarding.status_code == 202, onboarding.text
    onboarding_id = onboarding.json()["id"]
    picked = [job["architecture"] for job in api.get("/jobs", params={"onboarding": onboarding_id}).json()["items"]]
    victim = sorted(picked, key=truth)[len(picked) // 2]
    answered: list[str] = []
    while (final := _finished(api, onboarding_id)) is None:
        lease = agent.http.get("/agents/me/jobs/next", params={"wait": 1})
        if lease.status_code != 200:
            continue
        job = api.get(f"/jobs/{lease.json()['job_id']}").json()
        if job["kind"] == "canary":
            agent.finish(lease.json())
            continue
        ms = truth(job["architecture"])
        first = job["architecture"] == victim and victim not in answered
        agent.finish(lease.json(), **(first_answer(ms) if first else {"median_ms": ms}))
        answered.append(job["architecture"])
    assert final["status"] == "ready", final
    first_round, last_round = final["rounds"][0], final["rounds"][-1]
    assert victim in first_round["remeasuring"] and victim not in last_round["remeasuring"]
    assert answered.count(victim) == 3
    remeasured = [key for round_ in final["rounds"] for key in round_["remeasuring"]]
    assert sorted(answered) == sorted(picked + REMEASUREMENTS * remeasured)

    sessions = make_session_factory(make_engine(imported.database_url))
    with session_scope(sessions) as session:
        trained_on = [LatencyPredictor.load(session.get_one(Predictor, round_["predictor_id"]).checkpoint)
                      for round_ in (first_round, last_round)]
    victim_samples = [model.target.samples.get(space.network_key(victim)) if model.target else None
                      for model in trained_on]
    return victim_samples[0], victim_samples[1], truth(victim)


def test_a_suspect_sample_is_measured_twice_more_and_the_median_kept(imported: Settings, api: httpx.Client,
                                                                    tmp_path: Path) -> None:
    """A scripted device answers with a reference device's own latencies, one of them twice as
    slow the first time (a slowdown steady over a whole measurement passes the agent's checks):
    the adapted fit finds it suspect, the onboarding measures it twice more and adapts again on
    the median of the three, which is right."""
    first, last, truth = _onboard_with_one_bad_first_answer(
        api, imported, f"onboard-remeasure-{tmp_path.name[-8:]}", lambda ms: {"median_ms": 2 * ms})
    assert (first, last) == (pytest.approx(2 * truth), pytest.approx(truth))


def test_an_untrusted_measurement_is_measured_twice_more_and_then_trained_on(imported: Settings, api: httpx.Client,
                                                                            tmp_path: Path) -> None:
    """One first measurement scatters (its runs alternate between 0.8 and 1.2 times the latency:
    `unstable`, so the fit leaves it out); the onboarding measures it twice more, and the next
    fit trains on the median of the two steady ones."""
    first, last, truth = _onboard_with_one_bad_first_answer(
        api, imported, f"onboard-untrusted-{tmp_path.name[-8:]}",
        lambda ms: {"median_ms": ms, "samples": [0.8 * ms, 1.2 * ms] * 30})
    assert first is None and last == pytest.approx(truth)


def test_a_degraded_canary_marks_the_device_predictors_stale(settings: Settings) -> None:
    """The canary verdict itself is the farm's (tests/live/test_farm_jobs.py); here: what it does to predictors."""
    sessions = make_session_factory(make_engine(settings.database_url))
    with session_scope(sessions) as session:
        device = Device(name=f"stale-{time.time_ns()}", canary_baseline_ms=1.0)
        session.add(device)
        session.flush()
        predictor = Predictor(space_id=space_row(session, get_space("nb201")).id, kind=PredictorKind.adapted,
                              device_id=device.id, checkpoint=b"")
        canary = Job(kind=JobKind.canary, device_id=device.id, status=JobStatus.done, finished_at=utcnow())
        session.add_all([predictor, canary])
        session.flush()
        health.judge_canary(session, device, canary.id, (2.0, True), "", settings)  # twice its baseline
        assert device.state.value == "degraded"
        session.refresh(predictor)
        assert predictor.status is PredictorStatus.stale
