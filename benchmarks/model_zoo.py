"""The model-zoo check: standard CNNs no reference table measured, timed on this CPU by a real
agent and predicted leave-one-out by the graph-level (`onnx`) predictor.

    python benchmarks/model_zoo.py                          # 12 CNNs x (224, 160), standard preset
    python benchmarks/model_zoo.py --models resnet18 mobilenet_v2 squeezenet1_1 --resolutions 224

Everything goes through the HTTP API of a real server (SQLite) with a real agent on this CPU (ONNX
Runtime, one thread): the reference tables are imported, the `onnx` base predictor is pre-trained
on their ONNX exports (`POST /predictors/pretrain {"space": "onnx", "archs_per_space": N}`), the
zoo's models (`predictor.graph.zoo`: random weights, exported here) are uploaded and each measured
once. Then, for each model in turn, a collection of the *other* models is created and the device
is onboarded on all of its members (their measurements are reused, nothing is timed again), so
the adapted predictor never saw the held-out model, which `/predict` then answers for by its
sha256 with that predictor. Prints a line per model and

    model-zoo: n=N rho=X mape=Y
    baseline flops_ridge: n=N rho=X mape=Y      (ridge on log MACs, weight and activation bytes)
    baseline macs_loglinear: n=N rho=X mape=Y   (log-latency linear in log MACs)

the baselines fitted on the same leave-one-out splits to the same measurements.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from latfarm import FarmClient, Job
from latfarm.models import Preset
from predictor.bench.methods import ridge_fit_predict
from predictor.graph.encoding import SUMMARY_NAMES, encode_onnx
from predictor.graph.zoo import RESOLUTIONS, ZOO, ZooModel, zoo
from server.cli.local import running_agent, running_server
from server.db import upgrade
from server.services.runtime import import_reference_datasets
from server.settings import Settings

ADMIN_TOKEN = "model-zoo-bench-admin"
DEVICE = "zoo-cpu-ort-1t"
#: the whole-model summaries the FLOPs ridge regresses on (as in the cross-space bench)
RIDGE_FEATURES = ("log_macs", "log_weight_bytes", "log_activation_bytes")


@dataclass
class Measured:
    model: ZooModel
    sha256: str
    ms: float
    flags: list[str]
    summaries: dict[str, float]


def load_average() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def score(predicted: np.ndarray, measured: np.ndarray) -> tuple[float, float]:
    """Spearman's rho and the mean absolute percentage error."""
    return float(spearmanr(predicted, measured).statistic), float(np.mean(np.abs(predicted / measured - 1)) * 100)


def checked(answer: httpx.Response) -> dict:
    if answer.is_error:
        raise RuntimeError(f"{answer.request.method} {answer.request.url.path}: {answer.status_code} {answer.text}")
    return answer.json()


def pretrain_graph_base(api: httpx.Client, farm: FarmClient, archs_per_space: int) -> int:
    task = checked(api.post("/predictors/pretrain", json={"space": "onnx", "archs_per_space": archs_per_space}))
    done = farm.wait_for_task(task["id"], timeout_s=7200)
    assert done.predictor_id is not None  # a done task names its predictor
    return done.predictor_id


def measure_zoo(farm: FarmClient, models: list[ZooModel], preset: Preset, tries: int) -> list[Measured]:
    """Upload and measure every model; one whose measurement the server flagged (unstable, drift:
    a busy host) is measured again, up to `tries` times, so that the onboardings reuse valid ones."""
    uploaded: dict[str, tuple[ZooModel, dict[str, float]]] = {}
    for model in models:
        data = model.export()
        summaries = dict(zip(SUMMARY_NAMES, encode_onnx(data).vector[-len(SUMMARY_NAMES):].tolist()))
        uploaded[farm.upload_artifact(data).sha256] = (model, summaries)
    last: dict[str, Job] = {}
    pending = list(uploaded)
    for attempt in range(tries):
        jobs = farm.wait_for_jobs([farm.submit_artifact(DEVICE, sha, preset, force=attempt > 0) for sha in pending])
        for sha, job in zip(pending, jobs):
            if job.status != "done" or job.latency_ms is None:
                raise RuntimeError(f"{uploaded[sha][0].label}: job {job.id} {job.status}: {job.error}")
            last[sha] = job
        pending = [sha for sha in pending if last[sha].flags]
        print(f"measurement round {attempt + 1}: {len(pending)} of {len(uploaded)} flagged", file=sys.stderr,
              flush=True)
        if not pending:
            break
    return [Measured(model, sha, last[sha].latency_ms or 0.0, list(last[sha].flags or []), summaries)
            for sha, (model, summaries) in uploaded.items()]


def leave_one_out(api: httpx.Client, farm: FarmClient, measured: list[Measured], preset: Preset) -> np.ndarray:
    """Per model, the prediction of the device onboarded on every other model (over HTTP)."""
    predicted = []
    for i, held_out in enumerate(measured):
        others = [m.sha256 for j, m in enumerate(measured) if j != i]
        name = f"zoo-without-{held_out.model.name}-{held_out.model.resolution}"
        checked(api.post("/collections", json={"name": name, "artifacts": others}))
        started = checked(api.post(f"/devices/{DEVICE}/onboard", json={
            "space": "onnx", "collection": name, "samples": len(others), "preset": preset}))
        onboarding = farm.wait_for_onboarding(started["id"], timeout_s=1800)
        answer = farm.predict(DEVICE, "onnx", [held_out.sha256], predictor_id=onboarding.predictor_id)
        predicted.append(answer.latency_ms[0])
    return np.asarray(predicted)


def baseline(measured: list[Measured], features: tuple[str, ...]) -> np.ndarray:
    """Leave-one-out ridge of log-latency on the models' whole-graph summaries."""
    x = np.asarray([[m.summaries[name] for name in features] for m in measured])
    y = np.log([m.ms for m in measured])
    out = []
    for i in range(len(measured)):
        rest = np.arange(len(measured)) != i
        out.append(float(np.exp(ridge_fit_predict(x[rest], y[rest], x[i:i + 1])[0])))
    return np.asarray(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=ZOO, metavar="NAME")
    parser.add_argument("--resolutions", nargs="+", type=int, default=list(RESOLUTIONS))
    parser.add_argument("--preset", default="standard", choices=["quick", "standard", "rigorous"])
    parser.add_argument("--tries", type=int, default=4, help="measurements of a model at most while the server "
                                                                 "flags them (unstable, drift)")
    parser.add_argument("--archs-per-space", type=int, default=150,
                        help="architectures of each built-in space's table the onnx predictor pre-trains on")
    parser.add_argument("--workdir", help="keep the database, artifacts and graph-encoding cache here "
                                          "(a second run reuses the exports); default: a temporary folder")
    args = parser.parse_args()
    models = zoo(args.models, args.resolutions)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="latfarm-zoo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("latfarm.db", "agent-state", "agent-cache"):  # a fresh farm; the encoding cache stays
        path = workdir / stale
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    url_db = f"sqlite:///{workdir / 'latfarm.db'}"
    upgrade(url_db)
    settings = Settings(database_url=url_db, artifact_dir=workdir / "artifacts", admin_token=ADMIN_TOKEN,
                        poll_wait_s=2.0)
    started = time.monotonic()
    print(f"start: {load_average()}", flush=True)
    import_reference_datasets(settings, settings.datasets)
    print(f"imported the reference tables ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    try:
        with running_server(settings) as url, FarmClient(url, ADMIN_TOKEN) as farm, \
                httpx.Client(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                             timeout=120) as api, \
                running_agent(url, ADMIN_TOKEN, DEVICE, 1, workdir, ["--poll-wait", "1"]):
            base_id = pretrain_graph_base(api, farm, args.archs_per_space)
            base = farm.predictor(base_id)
            print(f"onnx base predictor {base_id}: {len(base.training_devices)} reference devices "
                  f"({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
            farm.wait_for_device(DEVICE)
            measured = measure_zoo(farm, models, args.preset, args.tries)
            print(f"measured {len(measured)} models ({time.monotonic() - started:.0f} s): {load_average()}",
                  flush=True)
            ours = leave_one_out(api, farm, measured, args.preset)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    truth = np.asarray([m.ms for m in measured])
    ridge = baseline(measured, RIDGE_FEATURES)
    loglinear = baseline(measured, ("log_macs",))
    print(f"{'model':28s} {'MMACs':>7s} {'measured ms':>11s} {'ours':>8s} {'ridge':>8s} {'loglin':>8s}  flags")
    for m, p, r, q in zip(measured, ours, ridge, loglinear):
        print(f"{m.model.label:28s} {np.expm1(m.summaries['log_macs']) / 1e6:7.0f} {m.ms:11.3f} {p:8.3f} {r:8.3f} "
              f"{q:8.3f}  {','.join(m.flags) or '-'}")
    print(f"end: {load_average()} ({time.monotonic() - started:.0f} s)")
    for label, predicted in (("model-zoo", ours), ("baseline flops_ridge", ridge),
                             ("baseline macs_loglinear", loglinear)):
        rho, mape = score(predicted, truth)
        print(f"{label}: n={len(truth)} rho={rho:.3f} mape={mape:.1f}")


if __name__ == "__main__":
    main()
