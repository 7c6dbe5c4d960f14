"""`/predict` under load, over real HTTP, against a `latfarm server` process with its default
workers on the embedded SQLite database.

The published tables are imported and an NB201 base predictor is pre-trained first (`latfarm
datasets import`, `latfarm pretrain`, a few minutes). Then `--clients` concurrent clients send
single-architecture requests for `--seconds` (random architectures, one reference device), and
the whole space (15,625 architectures) is predicted in one call `--space-calls` times. Latency
(p50, p99) is measured with one client calling back to back, throughput (rps) with `--clients`.

    python benchmarks/predict_load.py --clients 16 --seconds 20

Last, a pre-training is queued through the API and, while the server's training worker runs it,
the whole space is predicted for other reference devices, each call computing all 15,625 answers
afresh (`pretraining_space_s`: the slowest of those calls).

Ends with `predict: p50_ms=X p99_ms=Y rps=Z space_s=W` (W: median whole-space call; the first,
which loads the predictor and computes every answer, is `first_space_s`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from predictor.spaces import get_space  # noqa: E402
from server.cli.local import free_port, server_process  # noqa: E402

ADMIN_TOKEN = "predict-bench-admin"
DEVICE = "titan_rtx_256"


def prepare(env: dict[str, str]) -> None:
    """Import the published tables and pre-train the NB201 base predictor, as a user would."""
    for command in (["datasets", "import"], ["pretrain", "--space", "nb201"]):
        subprocess.run([sys.executable, "-m", "server.cli", *command], env={**os.environ, **env}, check=True,
                       stdout=subprocess.DEVNULL)


async def hammer(url: str, clients: int, seconds: float, keys: list[str]) -> tuple[list[float], float]:
    """Single-architecture calls from `clients` concurrent clients for `seconds`; returns the
    latencies (ms) and the wall time."""
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(base_url=f"{url}/api/v1", headers=headers, timeout=30,
                                 limits=httpx.Limits(max_connections=clients)) as http:
        async def client(seed: int) -> None:
            rng = random.Random(seed)
            while time.perf_counter() < deadline:
                body = {"device": DEVICE, "space": "nb201", "architectures": [rng.choice(keys)]}
                started = time.perf_counter()
                (await http.post("/predict", json=body)).raise_for_status()
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(client(i) for i in range(clients)))
        return latencies, time.perf_counter() - started


def whole_space_seconds(http: httpx.Client, devices: list[str]) -> list[float]:
    """Seconds of one whole-space call per entry of `devices`."""
    times = []
    for device in devices:
        started = time.perf_counter()
        reply = http.post("/predict", json={"device": device, "space": "nb201", "architectures": "all"})
        reply.raise_for_status()
        assert len(reply.json()["latency_ms"]) == 15_625
        times.append(time.perf_counter() - started)
    return times


def while_pretraining(http: httpx.Client) -> tuple[list[float], str]:
    """Whole-space calls for fresh reference devices while a queued pre-training runs; the times
    and the task's state after them (it must have been running throughout)."""
    base = http.get("/predictors", params={"space": "nb201"}).json()["items"][-1]
    others = [d for d in base["training_devices"] if d != DEVICE]
    task = http.post("/predictors/pretrain", json={"space": "nb201"}).json()
    while http.get(f"/tasks/{task['id']}").json()["status"] == "queued":
        time.sleep(0.2)
    times = whole_space_seconds(http, others[:8])
    return times, http.get(f"/tasks/{task['id']}").json()["status"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--space-calls", type=int, default=5)
    parser.add_argument("--workdir", type=Path, help="reuse a prepared folder (database and artifacts)")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="latfarm-predict-"))
    env = {"LATFARM_DATABASE_URL": f"sqlite:///{workdir / 'latfarm.db'}", "LATFARM_ADMIN_TOKEN": ADMIN_TOKEN,
           "LATFARM_ARTIFACT_DIR": str(workdir / "artifacts"),
           # one token drives every client here: its per-token limit would cap what is measured
           "LATFARM_PREDICT_RATE_LIMIT": ""}
    if not (workdir / "latfarm.db").exists():
        started = time.perf_counter()
        prepare(env)
        print(f"prepared (import + pre-train) in {time.perf_counter() - started:.0f} s: {workdir}", flush=True)
    keys = list(get_space("nb201").enumerate())
    port = free_port()
    with server_process(env, port, log=workdir / "server.log", access_log=False), \
            httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", timeout=120,
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
        url = f"http://127.0.0.1:{port}"
        first_space_s = whole_space_seconds(http, [DEVICE])[0]  # loads the predictor, computes every answer
        latencies, _ = asyncio.run(hammer(url, 1, args.seconds, keys))
        loaded, wall = asyncio.run(hammer(url, args.clients, args.seconds, keys))
        space_s = float(np.median(whole_space_seconds(http, [DEVICE] * args.space_calls)))
        during, task_state = while_pretraining(http)
    ms = np.asarray(latencies)
    print(f"while pre-training (task {task_state} after the calls): whole-space calls of "
          f"{', '.join(f'{s:.2f}' for s in during)} s")
    print(f"predict: p50_ms={np.percentile(ms, 50):.1f} p99_ms={np.percentile(ms, 99):.1f} "
          f"rps={len(loaded) / wall:.0f} space_s={space_s:.2f} first_space_s={first_space_s:.2f} "
          f"pretraining_space_s={max(during):.2f} clients={args.clients} loaded_p50_ms={np.percentile(loaded, 50):.1f}")


if __name__ == "__main__":
    main()
