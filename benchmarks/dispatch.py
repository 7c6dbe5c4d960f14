"""Dispatch throughput: N simulated agents lease jobs and post results over real HTTP against a
`latfarm server` process on a real Postgres database.

Each simulated agent registers with one device (two agents per device, so agents contend for
devices as well as for jobs) and its registration canary is run; then the queue is filled and the
agents are let loose, each looping like the real agent: post an ok result at once, asking for the
next lease with it (`lease_next`), and long-poll only when none came. The measurement itself is
not simulated; this measures the farm's dispatch path. Afterwards the database is checked: every
job done exactly once, one measurement per job, no job leased twice.

    python benchmarks/dispatch.py --agents 10 100 --jobs-per-agent 30 --workers 2

Prints one line per N: `dispatch: N=... jobs_per_s=... claim_p50_ms=... claim_p99_ms=...
server_cpu_ms_per_job=... postgres_cpu_ms_per_job=... double_leases=...`. A claim's latency is its long
poll's, or that of the result request that brought the lease. CPU is counted over the timed part: of
all server processes, and of the local Postgres server's processes (nan when it is not local).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import onnx
import psycopg
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.cli.local import free_port, server_process, temporary_postgres_database  # noqa: E402

ADMIN_TOKEN = "dispatch-bench-admin"
CAPABILITIES = {"hostname": "bench", "cpu_model": "simulated", "cpu_cores": 1, "memory_bytes": 1, "os": "linux",
                "python": "3", "agent_version": "bench"}
SAMPLES = [1.0] * 30
CANARY_POLL_S = 1.0


def tiny_onnx() -> bytes:
    """A one-node ONNX model: the artifact every job 'measures'."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    buffer = io.BytesIO()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), buffer)
    return buffer.getvalue()


def result_body(lease_id: str) -> dict[str, object]:
    stats = {"n": 30, "median_ms": 1.0, "mean_ms": 1.0, "min_ms": 1.0, "max_ms": 1.0, "p90_ms": 1.0,
             "iqr_ms": 0.0, "cv": 0.0}
    return {"lease_id": lease_id, "status": "ok", "stats": stats, "samples_ms": SAMPLES}


@dataclass
class Tally:
    claim_ms: list[float] = field(default_factory=list)
    results: int = 0


async def register(http: aiohttp.ClientSession, index: int, device: str) -> tuple[dict[str, str], float]:
    """Register a simulated agent; returns its auth header and the server's long-poll wait."""
    async with http.post("/api/v1/agents/register", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                         json={"name": f"sim-{index}", "devices": [{"name": device}],
                               "capabilities": CAPABILITIES}) as registered:
        reply = await registered.json()
    return {"Authorization": f"Bearer {reply['agent_token']}"}, reply["poll_wait_s"]


async def work(http: aiohttp.ClientSession, agent: tuple[dict[str, str], float], tally: Tally) -> None:
    """Lease and finish jobs like a real agent, until cancelled: each result asks for the next
    lease (`lease_next`), and the agent long-polls only when it gets none."""
    auth, poll_wait_s = agent
    lease = None
    while True:
        if lease is None:
            started = time.perf_counter()
            async with http.get("/api/v1/agents/me/jobs/next", params={"wait": poll_wait_s}, headers=auth) as leased:
                if leased.status == 204:
                    continue
                lease = await leased.json()
            tally.claim_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        async with http.post(f"/api/v1/jobs/{lease['job_id']}/result", params={"lease_next": "true"},
                             json=result_body(lease["lease_id"]), headers=auth) as posted:
            lease = (await posted.json())["next_lease"]
        tally.results += 1
        if lease is not None:
            tally.claim_ms.append((time.perf_counter() - started) * 1000)


async def drive(http: aiohttp.ClientSession, agents: list[tuple[dict[str, str], float]], results: int) -> Tally:
    """Run the agents until they have posted `results` results, then stop them (the queue is
    empty by then, so a long poll cut short leases nothing)."""
    tally = Tally()
    workers = [asyncio.create_task(work(http, agent, tally)) for agent in agents]
    try:
        while tally.results < results:
            await asyncio.sleep(0.05)
            for worker in workers:
                if worker.done():
                    worker.result()  # a failed agent fails the run
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return tally


async def submit_jobs(http: aiohttp.ClientSession, devices: list[str], per_device: int, sha256: str) -> int:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    queue = [{"device": device, "artifact": sha256, "preset": "quick", "force": True}
             for _ in range(per_device) for device in devices]

    async def post(body: dict[str, object]) -> None:
        async with http.post("/api/v1/jobs", json=body, headers=admin) as submitted:
            await submitted.read()

    for start in range(0, len(queue), 50):
        await asyncio.gather(*(post(body) for body in queue[start:start + 50]))
    return len(queue)


async def run_round(url: str, agents: int, jobs_per_agent: int, sha256: str, server_pid: int) -> dict[str, float]:
    devices = [f"sim-device-{agents}-{i}" for i in range(max(1, agents // 2))]
    connector = aiohttp.TCPConnector(limit=agents + 50)
    async with aiohttp.ClientSession(url, connector=connector, raise_for_status=True,
                                     timeout=aiohttp.ClientTimeout(total=60)) as http:
        simulated = await asyncio.gather(*(register(http, i, devices[i % len(devices)]) for i in range(agents)))
        # the registration canaries first, then a full queue: the timed part is dispatch alone. The
        # canary round polls briefly and lets the polls it leaves behind end before jobs arrive.
        await drive(http, [(auth, CANARY_POLL_S) for auth, _ in simulated], len(devices))
        await asyncio.sleep(CANARY_POLL_S + 1)
        submitted_at = time.perf_counter()
        total = await submit_jobs(http, devices, agents * jobs_per_agent // len(devices), sha256)
        submit_s = time.perf_counter() - submitted_at
        postgres = postmaster_pid()

        def cpu() -> tuple[float, float, float]:
            return cpu_seconds(server_pid), cpu_seconds(postgres) if postgres else math.nan, time.process_time()

        started, cpu_before = time.perf_counter(), cpu()
        tally = await drive(http, simulated, total)
        elapsed = time.perf_counter() - started
        server_cpu, postgres_cpu, bench_cpu = (after - before for after, before in zip(cpu(), cpu_before))
    claims = np.asarray(tally.claim_ms)
    return {"agents": agents, "devices": len(devices), "jobs": total, "seconds": elapsed,
            "jobs_per_s": total / elapsed, "submit_per_s": total / submit_s,
            "claim_p50_ms": float(np.percentile(claims, 50)), "claim_p99_ms": float(np.percentile(claims, 99)),
            "server_cpu_ms_per_job": server_cpu / total * 1000, "postgres_cpu_ms_per_job": postgres_cpu / total * 1000,
            "bench_cpu_ms_per_job": bench_cpu / total * 1000}


def _processes() -> dict[int, tuple[str, int, int]]:
    """pid -> (command name, parent pid, CPU ticks: its own user + system, and those of its children
    that ended) of every process (Linux /proc; empty elsewhere)."""
    processes = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, _, rest = text.partition("(")[2].rpartition(")")
        fields = rest.split()
        processes[int(stat.parent.name)] = (name, int(fields[1]), sum(int(tick) for tick in fields[11:15]))
    return processes


def cpu_seconds(root: int) -> float:
    """CPU time so far of process `root` and its descendants, ended ones included."""
    processes, tree, ticks = _processes(), {root}, 0
    for pid in sorted(processes):  # children have larger pids than their parents (no pid wrap-around here)
        _, parent, used = processes[pid]
        if pid == root or parent in tree:
            tree.add(pid)
            ticks += used
    return ticks / os.sysconf("SC_CLK_TCK")


def postmaster_pid() -> int | None:
    """The local Postgres server's main process: a `postgres` process whose parent is not one."""
    processes = _processes()
    return next((pid for pid, (name, parent, _) in processes.items()
                 if name == "postgres" and processes.get(parent, ("",))[0] != "postgres"), None)


def check_database(dsn: str) -> dict[str, int]:
    """Every job done once: none unfinished, none leased twice, exactly one measurement each, and
    never two running jobs on one device (the partial unique index would have refused the second
    lease, so a violation shows up as a lease that was lost and re-leased)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status <> 'done'), count(*) FILTER (WHERE attempts > 1),"
            " (SELECT count(*) FROM (SELECT job_id FROM measurements GROUP BY job_id HAVING count(*) > 1) d)"
            " FROM jobs"
        ).fetchone()
    assert row is not None
    unfinished, leased_twice, measured_twice = row
    return {"unfinished": unfinished, "leased_twice": leased_twice, "measured_twice": measured_twice}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--jobs-per-agent", type=int, default=30)
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    parser.add_argument("--postgres", default=os.environ.get("LATFARM_TEST_POSTGRES_URL",
                                                             "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = parser.parse_args()

    with temporary_postgres_database(args.postgres, "latfarm_dispatch") as dsn:
        workdir = Path(tempfile.mkdtemp(prefix="latfarm-dispatch-"))
        port = free_port()
        env = {"LATFARM_DATABASE_URL": dsn, "LATFARM_ADMIN_TOKEN": ADMIN_TOKEN,
               "LATFARM_ARTIFACT_DIR": str(workdir / "artifacts"), "LATFARM_CANARY_EVERY": "0"}
        with server_process(env, port, workers=args.workers, log=workdir / "server.log", access_log=False) as server:
            url = f"http://127.0.0.1:{port}"
            uploaded = httpx.post(f"{url}/api/v1/artifacts", content=tiny_onnx(),
                                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            uploaded.raise_for_status()
            for agents in args.agents:
                report = asyncio.run(run_round(url, agents, args.jobs_per_agent, uploaded.json()["sha256"],
                                                 server.pid))
                checks = check_database(dsn)
                double = checks["leased_twice"] + checks["measured_twice"]
                print(f"dispatch: N={agents} devices={report['devices']} jobs={report['jobs']} "
                      f"workers={args.workers} seconds={report['seconds']:.2f} jobs_per_s={report['jobs_per_s']:.0f} "
                      f"claim_p50_ms={report['claim_p50_ms']:.1f} claim_p99_ms={report['claim_p99_ms']:.1f} "
                      f"submit_per_s={report['submit_per_s']:.0f} server_cpu_ms_per_job={report['server_cpu_ms_per_job']:.1f} "
                      f"postgres_cpu_ms_per_job={report['postgres_cpu_ms_per_job']:.1f} "
                      f"bench_cpu_ms_per_job={report['bench_cpu_ms_per_job']:.1f} unfinished={checks['unfinished']} "
                      f"double_leases={double}", flush=True)


if __name__ == "__main__":
    main()
