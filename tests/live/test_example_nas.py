"""The NAS client example (`examples/latency_constrained_search.py`): its NB201 code agrees with the
predictor's search space, and a whole search runs against a real server with a real agent."""

from __future__ import annotations

import importlib.util
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from predictor.spaces import get_space
from predictor.spaces.nb201 import live_edges
from server.cli.local import running_agent
from server.services.runtime import pretrain_base
from server.settings import Settings
from tests.helpers import ADMIN_TOKEN, REPO, registered, wait_until

EXAMPLE = REPO / "examples" / "latency_constrained_search.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("latency_constrained_search", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_example_nb201_code_matches_the_search_space() -> None:
    example, space = load_example(), get_space("nb201")
    for key in space.sample(25, seed=3):
        ops = example.parse_key(key)
        assert example.arch_key(ops) == space.canonical(key) == key
        assert example.live_edges(ops) == live_edges(ops)
        # the `params` proxy is the exact parameter count of the network the farm builds
        assert example.param_count(ops) == sum(p.numel() for p in space.build(key).parameters())
    rng = random.Random(0)
    ops = example.random_arch(rng)
    for _ in range(200):
        child = example.mutate(ops, rng)
        assert sum(a != b for a, b in zip(ops, child)) == 1 and space.is_connected(example.arch_key(child))
        ops = child


def test_example_pareto_and_spearman_helpers() -> None:
    example = load_example()
    def c(proxy: float, ms: float) -> Any:
        return example.Candidate((proxy, int(ms * 10)), proxy, ms, 0.0)

    front = example.pareto_front([c(1, 1.0), c(2, 2.0), c(1, 1.5), c(3, 2.0), c(0.5, 0.5)])
    assert [(x.proxy, x.ms) for x in front] == [(0.5, 0.5), (1, 1.0), (3, 2.0)]
    assert example.pareto_ranks([c(1, 1.0), c(1, 1.5), c(0.5, 2.0)]) == [0, 1, 2]
    assert example.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert example.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert example.spearman([1, 2], [1, 2]) is None
    assert [x.ms for x in example.spread(front, 2)] == [0.5, 2.0]


@pytest.mark.slow
def test_latency_constrained_search_end_to_end(imported: Settings, server_url: str, api: httpx.Client,
                                               tmp_path: Path) -> None:
    predictors = api.get("/predictors", params={"space": "nb201"}).json()["items"]
    if not any(p["kind"] == "base" for p in predictors):
        pretrain_base(imported, "nb201", None, 0)
    # NAS code holds a client token, not the admin one
    token = api.post("/tokens", json={"name": "nas-example", "scopes": ["read", "predict", "submit"]}).json()["token"]
    device = f"nas-cpu-{tmp_path.name[-8:]}"
    with running_agent(server_url, ADMIN_TOKEN, device, 1, tmp_path, ["--poll-wait", "1"]) as agent:
        wait_until(lambda: registered(api, device), 60)
        started = api.post(f"/devices/{device}/onboard", json={"space": "nb201", "samples": 6, "preset": "quick"})
        assert started.status_code == 202, started.text
        onboarding = wait_until(
            lambda: (o := api.get(f"/onboardings/{started.json()['id']}").json())["status"] in ("ready", "failed")
            and o, 300)
        assert onboarding["status"] == "ready", onboarding
        # a budget this machine can meet with about half of the space: the median predicted latency
        sample = get_space("nb201").sample(200, seed=7)
        budget = statistics.median(api.post("/predict", json={"device": device, "space": "nb201",
                                                              "architectures": sample}).json()["latency_ms"])

        began = time.monotonic()
        command = [sys.executable, str(EXAMPLE), "--server", server_url, "--token", token, "--device", device,
                   "--budget-ms", f"{budget:.4f}", "--generations", "10", "--population", "16", "--children", "8",
                   "--seed", "1", "--verify", "--verify-max", "5", "--preset", "quick", "--json",
                   # within budget by the mean prediction: a 6-sample predictor's uncertainty is wide
                   "--confidence", "0"]
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
        elapsed = time.monotonic() - began
        assert agent.poll() is None, "the agent exited"
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert "generation 10/10" in run.stderr

    # the search ran on the device's adapted predictor, in batched calls
    used = next(p for p in api.get("/predictors", params={"space": "nb201"}).json()["items"]
                if p["id"] == summary["predictor"]["id"])
    assert used["kind"] == "adapted" and used["device"] == device and used["id"] >= onboarding["predictor_id"]
    assert 1 <= summary["predictor_calls"]["http_requests"] <= 11
    assert summary["predictor"]["device_measurements"] == used["metrics"]["samples"] >= 2
    scored = summary["predictor_calls"]["architectures_scored"]
    jobs = summary["measurements"]
    assert scored == summary["search"]["architectures_visited"] >= 16
    assert 1 <= jobs["jobs_submitted"] <= 5 and scored >= 8 * jobs["jobs_submitted"], (scored, jobs)

    # the Pareto set is within the budget by prediction, and non-dominated
    pareto = summary["pareto"]
    assert summary["pareto_size"] == len(pareto) >= 1
    for row in pareto:
        assert row["predicted_ms"] + summary["confidence"] * row["uncertainty_ms"] <= budget + 1e-6, row
    for a in pareto:
        assert not any(b["proxy"] >= a["proxy"] and b["predicted_ms"] <= a["predicted_ms"] and b is not a
                       and (b["proxy"] > a["proxy"] or b["predicted_ms"] < a["predicted_ms"]) for b in pareto)
    # the predictions are the server's: the same predictor gives the same numbers (the device's
    # newest predictor may differ by now: new measurements can trigger a re-adaptation)
    again = api.post("/predict", json={"device": device, "space": "nb201", "predictor_id": summary["predictor"]["id"],
                                       "architectures": [row["arch"] for row in pareto]}).json()
    assert again["latency_ms"] == pytest.approx([row["predicted_ms"] for row in pareto])

    # every verified architecture has a real measurement on the device, made through the farm
    verified = [row for row in pareto if row["verified"]]
    assert len(verified) == jobs["jobs_submitted"] == jobs["done"] == summary["verification"]["verified"]
    for row in verified:
        job = api.get(f"/jobs/{row['job_id']}").json()
        assert job["status"] == "done" and job["device"] == device and job["architecture"] == row["arch"]
        assert row["measured_ms"] == job["latency_ms"] > 0
        assert row["meets_budget_measured"] == (row["measured_ms"] <= budget)
        [measurement] = api.get("/measurements", params={"device": device, "space": "nb201",
                                                         "architecture": row["arch"]}).json()["items"]
        assert measurement["latency_ms"] == row["measured_ms"]
    check = summary["verification"]
    assert check["meet_budget_measured"] == sum(row["meets_budget_measured"] for row in verified)
    if len(verified) >= 3:
        assert -1.0 <= check["spearman_rho"] <= 1.0
    print(f"\nexample run: {elapsed:.1f} s, {scored} architectures scored in "
          f"{summary['predictor_calls']['http_requests']} /predict calls, {jobs['jobs_submitted']} measured, "
          f"Pareto set {len(pareto)}, {check['meet_budget_measured']}/{check['verified']} within budget, "
          f"rho {check['spearman_rho']}")
