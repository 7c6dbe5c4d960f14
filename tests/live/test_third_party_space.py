"""A search space shipped as a package of its own (examples/chain_space), onboarded end to end.

The package is installed with pip into a temporary folder, not into the test environment, and
that folder goes on the PYTHONPATH of a real `latfarm server` process only: the server finds the
space through its `latfarm.spaces` entry point, with no file of latfarm changed. The space has no
reference tables: its base predictor is the graph-level one, pre-trained on the reference spaces'
ONNX exports. A real agent (onnxruntime) measures sampled architectures for a new device, the
server adapts, and `/predict` answers for architectures of the space it never measured, checked
against measurements made after the fit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from scipy.stats import spearmanr

from latfarm import FarmClient
from predictor.spaces import space_names
from server.cli.local import free_port, running_agent, server_process
from tests.helpers import (
    ADMIN_TOKEN,
    CHAIN_SPACE_PACKAGE,
    DATASETS,
    assert_json_error,
    registered,
    wait_until,
    write_dist_info,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
SPACE = "chain"
SAMPLES = 8
CHECKS = 10


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package installed into a folder of its own (a copy is built: pip writes its
    build folders beside the sources)."""
    root = tmp_path_factory.mktemp("plugin")
    source = root / "chain_space"
    shutil.copytree(CHAIN_SPACE_PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, timeout=300)
    # and a broken one beside it: the server must start and serve the others
    write_dist_info(site, "broken-space", {"broken": "no_such_module_here:Space"})
    return site


@pytest.fixture(scope="module")
def farm_url(plugin_site: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server process that sees the plugin, on a database of its own (another process's training
    worker, blind to the space, must not claim its tasks), with the reference tables imported."""
    root = tmp_path_factory.mktemp("farm")
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(plugin_site), os.environ.get("PYTHONPATH")])),
        "LATFARM_DATABASE_URL": f"sqlite:///{root / 'latfarm.db'}", "LATFARM_DATASETS": str(DATASETS),
        "LATFARM_ARTIFACT_DIR": str(root / "artifacts"), "LATFARM_ADMIN_TOKEN": ADMIN_TOKEN,
        "LATFARM_POLL_WAIT_S": "2", "LATFARM_HEARTBEAT_S": "1", "LATFARM_READAPT_DELAY_S": "1",
    }
    subprocess.run([sys.executable, "-m", "server.cli", "db", "upgrade"], env={**os.environ, **env}, check=True,
                   capture_output=True, timeout=120)
    started = time.perf_counter()
    # the NB201 tables alone: the space pre-trains on whatever reference spaces are imported
    subprocess.run([sys.executable, "-m", "server.cli", "datasets", "import", "--space", "nb201"],
                   env={**os.environ, **env}, check=True, capture_output=True, timeout=900)
    print(f"reference tables imported in {time.perf_counter() - started:.0f} s")
    port = free_port()
    with server_process(env, port, log=root / "server.log"):
        yield f"http://127.0.0.1:{port}"


def test_an_installed_space_is_listed_pretrained_onboarded_and_predicted(farm_url: str, tmp_path: Path) -> None:
    assert SPACE not in space_names()  # the test environment itself never had it installed
    farm = FarmClient(farm_url, ADMIN_TOKEN)
    api = httpx.Client(base_url=f"{farm_url}/api/v1", timeout=120, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with farm, api:
        spaces = {space.name: space for space in farm.spaces()}
        assert {SPACE, "nb201", "fbnet", "ofa", "onnx"} <= set(spaces)
        chain = spaces[SPACE]
        assert chain.size == 6**3 and chain.graph_encoded and chain.builds_networks and not chain.has_reference_tables
        assert chain.base_predictor_id is None and chain.example_key is not None
        # what it pre-trains on: the devices of the reference spaces' tables
        assert set(spaces["nb201"].reference_devices) <= set(chain.reference_devices)
        assert "pixel3" in chain.reference_devices
        # the broken plug-in is left out, and naming it says why
        assert "broken" not in spaces
        error = assert_json_error(api.post("/architectures", json={"space": "broken", "key": "x"}), 422, "space")
        assert "broken-space 0.1.0" in error["detail"] and "ModuleNotFoundError" in error["detail"]

        started = time.perf_counter()
        # a small sample of each reference space's table keeps the exports to a few dozen
        task = api.post("/predictors/pretrain", json={"space": SPACE, "archs_per_space": 10})
        assert task.status_code == 202, task.text
        done = wait_until(lambda: (t := api.get(f"/tasks/{task.json()['id']}").json())["status"] in ("done", "failed")
                          and t, 900, 1.0)
        assert done["status"] == "done", done
        print(f"pre-trained in {time.perf_counter() - started:.0f} s")
        base = farm.predictor(done["predictor_id"])
        assert base.space == SPACE and base.kind == "base" and "pixel3" in base.training_devices
        assert {space.name: space for space in farm.spaces()}[SPACE].base_predictor_id == base.id
        # a reference device is predicted at once, for any key of the space
        small, large = "k3_w16-k3_w16-k3_w16", "k5_w64-k5_w64-k5_w64"
        reference = farm.predict("pixel3", SPACE, [small, large])
        assert reference.predictor_kind == "base" and 0 < reference.latency_ms[0] < reference.latency_ms[1]

        device = f"chain-cpu-{tmp_path.name[-8:]}"
        with running_agent(farm_url, ADMIN_TOKEN, device, 1, tmp_path, ["--poll-wait", "1"]):
            wait_until(lambda: registered(api, device), 60)
            started = time.perf_counter()
            # random: the validated samplers embed every candidate, an ONNX export each here
            onboarding = api.post(f"/devices/{device}/onboard", json={"space": SPACE, "samples": SAMPLES,
                                                                      "sampler": "random", "preset": "quick"})
            assert onboarding.status_code == 202, onboarding.text
            final = wait_until(lambda: (o := api.get(f"/onboardings/{onboarding.json()['id']}").json())["status"]
                               in ("ready", "failed") and o, 600, 0.5)
            assert final["status"] == "ready", final
            print(f"onboarded with {SAMPLES} samples in {time.perf_counter() - started:.0f} s")
            sampled = api.get("/jobs", params={"onboarding": final["id"]}).json()["items"]
            assert len({job["architecture"] for job in sampled}) == SAMPLES  # an untrusted one is measured again
            assert all(job["status"] == "done" and job["latency_ms"] > 0 and
                                                   job["space"] == SPACE for job in sampled)
            # architectures the predictor never saw, measured for the check only after the fit
            seen = {job["architecture"] for job in sampled}
            unseen = [key for key in _spread_keys() if key not in seen][:CHECKS]
            checks = farm.measure(device, SPACE, unseen, preset="quick")
        # the fit the onboarding made (the check measurements re-adapt the device meanwhile)
        prediction = farm.predict(device, SPACE, unseen, predictor_id=final["predictor_id"])
    assert prediction.predictor_id == final["predictor_id"] and prediction.predictor_kind == "adapted"
    measured = [job.latency_ms or 0.0 for job in checks]
    assert all(job.status == "done" for job in checks) and all(ms > 0 for ms in measured)
    rho = spearmanr(prediction.latency_ms, measured).statistic
    errors = [abs(p - m) / m for p, m in zip(prediction.latency_ms, measured)]
    print(f"onboarded on {SAMPLES} samples: rho {rho:.3f}, MAPE {100 * sum(errors) / len(errors):.0f} % "
          f"on {len(unseen)} unmeasured architectures")
    assert rho > 0.7


def _spread_keys() -> list[str]:
    """Keys from the lightest to the heaviest blocks, so the check spans the latency range."""
    ops = [f"k{kernel}_w{width}" for kernel in (3, 5) for width in (16, 32, 64)]
    return ["-".join(ops[(i + shift) % len(ops)] for shift in (0, 2, 4)) for i in range(len(ops))] + \
        ["-".join([op] * 3) for op in ops]
