"""The model-zoo check: standard CNNs no reference table measured, timed on this CPU by a real
agent and predicted by the graph-level (`onnx`) predictor for models it was not adapted on.

    python benchmarks/model_zoo.py                          # 12 CNNs x (224, 160), standard preset
    python benchmarks/model_zoo.py --models resnet18 mobilenet_v2 squeezenet1_1 --resolutions 224

Over the HTTP API of a real server (SQLite) with a real agent on this CPU (ONNX Runtime, one
thread): the reference tables are imported, the `onnx` base predictor is pre-trained on their
ONNX exports (`POST /predictors/pretrain {"space": "onnx", "archs_per_space": N}`), the zoo's
models (`predictor.graph.zoo`, random weights, exported here) are uploaded and each is measured
`--repeats` times (its lowest median counts: the run load disturbed least).

The held-out predictions run in this process, on the farm's stored base predictor, adapted
exactly as an onboarding adapts it (`base.adapt(latencies, name=device)`). Not through onboarding
over HTTP: the server reuses only unflagged measurements, and on a shared host most are flagged
(unstable, drift), so each of the 36 onboardings would time the other models again and adapt on
other figures than the ones scored. Two splits: each model held out alone (leave-one-out), and
both input sizes of an architecture held out together (the other size of the same network is
the easiest hint). Prints a line per model and

    model-zoo: n=N rho=X mape=Y
    model-zoo baseline flops_ridge: n=N rho=X mape=Y      (ridge on log MACs, weight and activation bytes)
    model-zoo baseline macs_loglinear: n=N rho=X mape=Y   (log-latency linear in log MACs)
    model-zoo, architecture held out: ...                 (and its baselines)

the baselines fitted on the same splits to the same measurements.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from latfarm import FarmClient, Job
from latfarm.models import Preset
from predictor.bench.methods import ridge_fit_predict
from predictor.graph.encoding import SUMMARY_NAMES
from predictor.graph.zoo import RESOLUTIONS, ZOO, ZooModel, zoo
from predictor.model import LatencyPredictor
from predictor.spaces import get_space
from server.cli.local import running_agent, running_server
from server.db import make_engine, make_session_factory, session_scope, upgrade
from server.models import Predictor
from server.services.runtime import import_reference_datasets
from server.settings import Settings

ADMIN_TOKEN = "model-zoo-bench-admin"
DEVICE = "zoo-cpu-ort-1t"
#: ResNet-34 and -50 are 87 and 102 MB in fp32, above the server's default 64 MiB body limit
MAX_UPLOAD_BYTES = 256 * 1024 * 1024
#: the whole-model summaries the FLOPs ridge regresses on (as in the cross-space bench)
RIDGE_FEATURES = ("log_macs", "log_weight_bytes", "log_activation_bytes")


@dataclass
class Measured:
    model: ZooModel
    sha256: str
    ms: float
    flagged: int  # of its measurements, those the server flagged (unstable, drift, short)
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


def measure_zoo(farm: FarmClient, models: list[ZooModel], preset: Preset, repeats: int) -> list[Measured]:
    """Upload every model and measure it `repeats` times (rounds over the whole zoo, so that load
    on a shared host hits all models alike); a model's latency is its lowest median, the run
    load disturbed least."""
    uploaded: dict[str, tuple[ZooModel, dict[str, float]]] = {}
    space = get_space("onnx")  # the held-out predictions run in this process: it encodes the models too
    for model in models:
        data = model.export()
        vector = space.features([space.add(data)])[0]
        summaries = dict(zip(SUMMARY_NAMES, vector[-len(SUMMARY_NAMES):].tolist()))
        uploaded[farm.upload_artifact(data).sha256] = (model, summaries)
    runs: dict[str, list[Job]] = {sha: [] for sha in uploaded}
    for attempt in range(repeats):
        jobs = farm.wait_for_jobs([farm.submit_artifact(DEVICE, sha, preset, force=attempt > 0) for sha in uploaded])
        for sha, job in zip(uploaded, jobs):
            if job.status != "done" or job.latency_ms is None:
                raise RuntimeError(f"{uploaded[sha][0].label}: job {job.id} {job.status}: {job.error}")
            runs[sha].append(job)
        print(f"measurement round {attempt + 1} of {repeats}", file=sys.stderr, flush=True)
    return [Measured(model, sha, min(job.latency_ms or 0.0 for job in runs[sha]),
                     sum(bool(job.flags) for job in runs[sha]), summaries)
            for sha, (model, summaries) in uploaded.items()]


def base_predictor(settings: Settings, predictor_id: int) -> LatencyPredictor:
    """The farm's stored base predictor, as its training worker loads it."""
    with session_scope(make_session_factory(make_engine(settings.database_url))) as session:
        checkpoint = session.scalar(select(Predictor.checkpoint).where(Predictor.id == predictor_id))
    assert checkpoint is not None
    return LatencyPredictor.load(checkpoint)


#: how the models are split into held-out folds: each model alone, or both input sizes of an architecture
FOLDS: dict[str, Callable[[ZooModel], str]] = {
    "model-zoo": lambda model: f"{model.name}-{model.resolution}",
    "model-zoo, architecture held out": lambda model: model.name,
}


def held_out_predictions(base: LatencyPredictor, measured: list[Measured],
                         fold_of: Callable[[ZooModel], str]) -> np.ndarray:
    """Per model, the prediction of the base adapted (as an onboarding adapts it) to the
    measurements of every model outside its fold."""
    predicted = np.zeros(len(measured))
    for fold in dict.fromkeys(fold_of(m.model) for m in measured):
        held_out = [i for i, m in enumerate(measured) if fold_of(m.model) == fold]
        adapted = base.adapt({m.sha256: m.ms for i, m in enumerate(measured) if i not in held_out}, name=DEVICE)
        predicted[held_out] = adapted.predict([measured[i].sha256 for i in held_out])[0]
    return predicted


def baseline(measured: list[Measured], features: tuple[str, ...], fold_of: Callable[[ZooModel], str]) -> np.ndarray:
    """Per model, a ridge of log-latency on the whole-graph summaries of the models outside its fold."""
    x = np.asarray([[m.summaries[name] for name in features] for m in measured])
    y = np.log([m.ms for m in measured])
    folds = np.asarray([fold_of(m.model) for m in measured])
    predicted = np.zeros(len(measured))
    for fold in set(folds):
        out = folds == fold
        predicted[out] = np.exp(ridge_fit_predict(x[~out], y[~out], x[out]))
    return predicted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=ZOO, metavar="NAME")
    parser.add_argument("--resolutions", nargs="+", type=int, default=list(RESOLUTIONS))
    parser.add_argument("--preset", default="standard", choices=["quick", "standard", "rigorous"])
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each model (its lowest median counts)")
    parser.add_argument("--archs-per-space", type=int, default=150,
                        help="architectures of each built-in space's table the onnx predictor pre-trains on")
    parser.add_argument("--workdir", help="keep the database, artifacts and graph-encoding cache here "
                                          "(a second run reuses the exports); default: a temporary folder")
    args = parser.parse_args()
    models = zoo(args.models, args.resolutions)
    if len(set(args.models)) < 3:
        parser.error("name 3 models at least: each held-out fold leaves the others to adapt on")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="latfarm-zoo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("latfarm.db", "agent-state", "agent-cache"):  # a fresh farm; the encoding cache stays
        path = workdir / stale
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    url_db = f"sqlite:///{workdir / 'latfarm.db'}"
    upgrade(url_db)
    settings = Settings(database_url=url_db, artifact_dir=workdir / "artifacts", admin_token=ADMIN_TOKEN,
                        poll_wait_s=2.0, max_body_bytes=MAX_UPLOAD_BYTES)
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
            print(f"onnx base predictor {base_id}: {len(farm.predictor(base_id).training_devices)} reference devices "
                  f"({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
            farm.wait_for_device(DEVICE)
            measured = measure_zoo(farm, models, args.preset, args.repeats)
            print(f"measured {len(measured)} models ({time.monotonic() - started:.0f} s): {load_average()}",
                  flush=True)
        base = base_predictor(settings, base_id)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    ours = {label: held_out_predictions(base, measured, fold_of) for label, fold_of in FOLDS.items()}
    truth = np.asarray([m.ms for m in measured])
    rows: dict[str, dict[str, np.ndarray]] = {}
    for label, fold_of in FOLDS.items():
        rows[label] = {"ours": ours[label], "flops_ridge": baseline(measured, RIDGE_FEATURES, fold_of),
                       "macs_loglinear": baseline(measured, ("log_macs",), fold_of)}
    loo = rows["model-zoo"]
    print(f"{'model':28s} {'MMACs':>7s} {'measured ms':>11s} {'ours':>8s} {'ridge':>8s} {'loglin':>8s} "
          f"{'ours, arch out':>14s}  flagged")
    for i, m in enumerate(measured):
        print(f"{m.model.label:28s} {np.expm1(m.summaries['log_macs']) / 1e6:7.0f} {m.ms:11.3f} "
              f"{loo['ours'][i]:8.3f} {loo['flops_ridge'][i]:8.3f} {loo['macs_loglinear'][i]:8.3f} "
              f"{rows['model-zoo, architecture held out']['ours'][i]:14.3f}  {m.flagged}/{args.repeats}")
    print(f"end: {load_average()} ({time.monotonic() - started:.0f} s)")
    for label, methods in rows.items():
        for method, predicted in methods.items():
            rho, mape = score(predicted, truth)
            name = label if method == "ours" else f"{label} baseline {method}"
            print(f"{name}: n={len(truth)} rho={rho:.3f} mape={mape:.1f}")


if __name__ == "__main__":
    main()
