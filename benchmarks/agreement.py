"""Do measurements agree? Two modes, each printing the median of the per-architecture latency
ratios and the Spearman rank correlation over NB201 artifacts:

    python benchmarks/agreement.py --archs 50 --preset standard      # two agents on this host
    python benchmarks/agreement.py --runtime openvino --archs 30     # the agent vs the vendor's tool

Two agents: two real agent processes (two device names on this host) measure the same artifacts
one after the other, so they never share a core. Ends with
`agreement: archs=N median_ratio=R rho=P flagged_a=.. flagged_b=..`.

Agent vs vendor tool (`--runtime`): a real agent with that runtime times each artifact (uploaded to
a real server) with one thread, and so does the runtime's own benchmark on the same CPU the agent
pins its measurement to: OpenVINO's `benchmark_app` (sync API, one stream, one thread, fp32),
LiteRT's `benchmark_litert_model`, ONNX Runtime timed directly by a minimal session loop. The two
alternate, so that load on a shared machine hits both alike: agent, tool, tool, agent for one
artifact, tool, agent, agent, tool for the next, each side's figure the lower of its two medians.
Ends with `agreement: runtime=R n=N median_ratio=X rho=Y` (ratio = agent / tool), and the same
figures on the minimum run time (`min_ratio`, `min_rho`), which load disturbs least.
Artifacts are exported once into `--artifact-cache` (LiteRT conversion takes tens of seconds each).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from agent.protocol import ARTIFACT_FORMATS, Runtime
from agent.timing import choose_cpus
from latfarm import FarmClient, Job
from latfarm.models import Preset
from predictor.export import export_onnx, export_tflite
from predictor.spaces import get_space
from server.cli.local import running_agent, running_server
from server.db import upgrade
from server.settings import Settings

ADMIN_TOKEN = "agreement-bench-admin"
SPACE = "nb201"
#: the vendor tools' run counts and duration: about as many runs as the agent's standard preset
TOOL_SECONDS = 2
TOOL_RUNS, TOOL_WARMUP = 300, 30
EXPORTERS = {"onnx": export_onnx, "tflite": export_tflite}

#: ONNX Runtime timed directly: the session settings of the agent's runtime, a plain loop
_ORT_DIRECT = """
import sys, time, json, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = int(sys.argv[2]); o.inter_op_num_threads = 1
o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
s = ort.InferenceSession(sys.argv[1], sess_options=o, providers=["CPUExecutionProvider"])
feed = {i.name: np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in i.shape])
        .astype(np.float32) for i in s.get_inputs()}
for _ in range(int(sys.argv[4])): s.run(None, feed)
times = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter_ns(); s.run(None, feed); times.append((time.perf_counter_ns() - t) / 1e6)
print(json.dumps({"median_ms": float(np.median(times)), "min_ms": min(times)}))
"""


def measure_on(url: str, device: str, keys: list[str], preset: Preset, workdir: Path) -> list[Job]:
    agent_dir = workdir / device
    agent_dir.mkdir()
    with running_agent(url, ADMIN_TOKEN, device, 1, agent_dir), FarmClient(url, ADMIN_TOKEN) as farm:
        farm.wait_for_device(device)
        return farm.measure(device, SPACE, keys, preset)


def two_agents(args: argparse.Namespace, keys: list[str], workdir: Path, settings: Settings) -> None:
    with running_server(settings) as url:
        a = measure_on(url, "agree-a", keys, args.preset, workdir)
        b = measure_on(url, "agree-b", keys, args.preset, workdir)
    pairs = [(x.latency_ms, y.latency_ms) for x, y in zip(a, b) if x.status == y.status == "done"]
    la, lb = np.asarray(pairs).T
    ratio = float(np.median(la / lb))
    rho = float(spearmanr(la, lb).statistic)
    flagged_a = sum(bool(job.flags) for job in a)
    flagged_b = sum(bool(job.flags) for job in b)
    print(f"agreement: archs={len(pairs)} preset={args.preset} median_ratio={ratio:.4f} rho={rho:.4f} "
          f"flagged_a={flagged_a} flagged_b={flagged_b}")


def exported(cache: Path, key: str, fmt: str) -> Path:
    """The artifact of `key` in `fmt`, exported on first use into `cache`."""
    path = cache / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.{fmt}"  # benchmark_app needs the suffix
    if not path.exists():
        data = EXPORTERS[fmt](get_space(SPACE), key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path


def vendor_tool(runtime: Runtime, model: Path, threads: int, cpus: list[int]) -> tuple[float, float]:
    """(median, min) in ms of the runtime's own benchmark of `model`, pinned to `cpus`."""
    pin = ["taskset", "-c", ",".join(map(str, cpus))]
    if runtime is Runtime.openvino:
        out = _run([*pin, "benchmark_app", "-m", str(model), "-d", "CPU", "-hint", "none", "-nstreams", "1",
                    "-nthreads", str(threads), "-nireq", "1", "-api", "sync", "-infer_precision", "f32",
                    "-t", str(TOOL_SECONDS)])
        return _ms("Median", out), _ms("Min", out)
    if runtime is Runtime.litert:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            _run([*pin, sys.executable, "-m", "ai_edge_litert.tools.benchmark_litert_model", "--model", str(model),
                  "--num_threads", str(threads), "--num_runs", str(TOOL_RUNS), "--warmup_runs", str(TOOL_WARMUP),
                  "--result_json", str(result)])
            latency = json.loads(result.read_text())["latency"]
        return float(latency["median_ms"]), float(latency["min_ms"])
    if runtime is Runtime.onnxruntime:
        out = _run([*pin, sys.executable, "-c", _ORT_DIRECT, str(model), str(threads), str(TOOL_RUNS),
                    str(TOOL_WARMUP)])
        timed = json.loads(out.strip().splitlines()[-1])
        return float(timed["median_ms"]), float(timed["min_ms"])
    raise SystemExit(f"no vendor tool for runtime {runtime.value}")


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{command[3]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def _ms(statistic: str, text: str) -> float:
    """benchmark_app's `statistic` line in ms (it prints "us" below a millisecond)."""
    match = re.search(rf"{statistic}:\s+([\d.]+) (ms|us)", text)
    if match is None:
        raise RuntimeError(f"no {statistic} latency in the tool's output:\n{text[-2000:]}")
    return float(match.group(1)) / (1000 if match.group(2) == "us" else 1)


def agent_timing(farm: FarmClient, api: httpx.Client, device: str, sha256: str,
                 preset: Preset) -> tuple[float, float]:
    """(median, min) in ms of the agent's measurement of an uploaded artifact (the minimum from the
    measurement's stats, which the client does not read)."""
    [done] = farm.wait_for_jobs([farm.submit_artifact(device, sha256, preset, force=True)])
    if done.status != "done" or done.latency_ms is None:
        raise RuntimeError(f"agent job failed: {done}")
    page = api.get("/measurements", params={"device": device}).raise_for_status().json()
    [measured] = [m for m in page["items"] if m["job_id"] == done.id]
    return done.latency_ms, float(measured["stats"]["min_ms"])


def _lower(x: tuple[float, float], y: tuple[float, float]) -> tuple[float, float]:
    """(median, min) of two runs: the lower of each."""
    return min(x[0], y[0]), min(x[1], y[1])


def agent_vs_tool(args: argparse.Namespace, keys: list[str], workdir: Path, settings: Settings) -> None:
    runtime = Runtime(args.runtime)
    fmt = ARTIFACT_FORMATS[runtime].value
    cache = Path(args.artifact_cache)
    device = f"agree-{runtime.value}"
    cpus = choose_cpus(1) or [0]  # the CPU the agent pins its measurement child to
    pairs: list[tuple[float, float, float, float]] = []
    with running_server(settings) as url, FarmClient(url, ADMIN_TOKEN) as farm, \
            httpx.Client(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as api, \
            running_agent(url, ADMIN_TOKEN, device, 1, workdir, ["--runtime", runtime.value, "--poll-wait", "1"]):
        farm.wait_for_device(device)
        for index, key in enumerate(keys):
            model = exported(cache, key, fmt)
            sha = farm.upload_artifact(model.read_bytes()).sha256

            by_agent = partial(agent_timing, farm, api, device, sha, args.preset)
            by_tool = partial(vendor_tool, runtime, model, 1, cpus)
            # ABBA, then BAAB: the lower of each side's two medians is the one a burst of load disturbed less
            if index % 2 == 0:
                a1, t1, t2, a2 = by_agent(), by_tool(), by_tool(), by_agent()
            else:
                t1, a1, a2, t2 = by_tool(), by_agent(), by_agent(), by_tool()
            agent, tool = _lower(a1, a2), _lower(t1, t2)
            if min(tool) <= 0:  # benchmark_litert_model reports milliseconds to two decimals
                print(f"{index + 1}/{len(keys)} skipped: the tool's figure {tool[0]} ms is below its resolution")
                continue
            pairs.append((*agent, *tool))
            print(f"{index + 1}/{len(keys)} agent={agent[0]:.3f} ms tool={tool[0]:.3f} ms "
                  f"ratio={agent[0] / tool[0]:.3f}", flush=True)
    agent_median, agent_min, tool_median, tool_min = np.asarray(pairs).T
    print(f"agreement: runtime={runtime.value} n={len(pairs)} "
          f"median_ratio={np.median(agent_median / tool_median):.4f} "
          f"rho={spearmanr(agent_median, tool_median).statistic:.4f} "
          f"min_ratio={np.median(agent_min / tool_min):.4f} min_rho={spearmanr(agent_min, tool_min).statistic:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", type=int, default=50)
    parser.add_argument("--preset", default="standard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runtime", choices=[r.value for r in (Runtime.onnxruntime, Runtime.openvino, Runtime.litert)],
                        help="compare the agent with this runtime's own benchmark tool instead of two agents")
    parser.add_argument("--artifact-cache", default=str(Path(tempfile.gettempdir()) / "latfarm-agreement-artifacts"),
                        help="where exported artifacts are kept between runs")
    args = parser.parse_args()

    keys = get_space(SPACE).sample(args.archs, args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="latfarm-agreement-"))
    url_db = f"sqlite:///{workdir / 'latfarm.db'}"
    upgrade(url_db)
    settings = Settings(database_url=url_db, artifact_dir=workdir / "artifacts", admin_token=ADMIN_TOKEN,
                        poll_wait_s=2.0)
    try:
        if args.runtime is None:
            two_agents(args, keys, workdir, settings)
        else:
            agent_vs_tool(args, keys, workdir, settings)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
