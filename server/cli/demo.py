"""`latfarm demo`: the headline flow on one machine, with real measurements of this CPU."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from agent.capabilities import default_device_name
from agent.protocol import Runtime
from latfarm import FarmClient
from predictor import metrics
from predictor.spaces import get_space
from server.cli.local import running_agent, running_server
from server.cli.output import progress_bar, track
from server.services.runtime import import_reference_datasets, pretrain_base
from server.settings import Settings

SPACE = "nb201"
THREADS = 1


def held_out_keys(exclude: set[str], n: int, seed: int) -> list[str]:
    candidates = get_space(SPACE).sample(n + len(exclude), seed=seed + 1)
    return [key for key in candidates if key not in exclude][:n]


@dataclass(frozen=True)
class CheckScore:
    """Predicted against measured latency over some of the held-out architectures."""

    rho: float
    mape: float  # %


def check_score(measured: np.ndarray, predicted: np.ndarray) -> CheckScore | None:
    """Spearman's rho and the mean absolute percentage error; None below 3 points, where a rank
    correlation says nothing."""
    if len(measured) < 3:
        return None
    return CheckScore(metrics.spearman(predicted, measured), metrics.mape(predicted, measured))


def scatter_plot(path: Path, measured: np.ndarray, predicted: np.ndarray, trusted: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 5), dpi=120)
    axes.scatter(measured[trusted], predicted[trusted], s=14, alpha=0.8, label="trusted measurement")
    axes.scatter(measured[~trusted], predicted[~trusted], s=14, alpha=0.8, facecolors="none", edgecolors="tab:orange",
                 label="flagged (unstable or drifting runs)")
    low, high = min(measured.min(), predicted.min()) * 0.9, max(measured.max(), predicted.max()) * 1.1
    axes.plot([low, high], [low, high], color="grey", linewidth=1, linestyle="--")
    axes.set(xlabel="measured latency (ms)", ylabel="predicted latency (ms)", title=title, xlim=(low, high),
             ylim=(low, high))
    axes.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def run_demo(out: Path, samples: int, check: int, seed: int, console: Console,
             runtime: Runtime = Runtime.onnxruntime) -> None:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings(database_url=f"sqlite:///{(out / 'latfarm.db').resolve()}", artifact_dir=out / "artifacts",
                        admin_token=secrets.token_urlsafe(24), poll_wait_s=5.0)
    if not (settings.datasets / "devices.csv").is_file():
        raise SystemExit(f"no reference tables in {settings.datasets}: unset LATFARM_DATASETS to use the shipped ones")
    console.rule("latfarm demo")
    with progress_bar() as progress:
        report = import_reference_datasets(settings, settings.datasets, progress)
    console.print(f"reference data: {report.measurements_inserted:,} measurements imported "
                  f"({report.devices_skipped} device tables already present)")
    with progress_bar() as progress:
        base = pretrain_base(settings, SPACE, None, seed, progress)
    console.print(f"base predictor {base.id} on {len(base.training_devices)} reference devices "
                  f"({base.metrics['train_seconds']} s)")

    device = default_device_name(THREADS, runtime=runtime)
    assert settings.admin_token is not None
    with running_server(settings) as url, \
            running_agent(url, settings.admin_token, device, THREADS, out, ["--runtime", runtime.value]), \
            FarmClient(url, settings.admin_token) as client:
        client.wait_for_device(device)
        console.print(f"agent registered device [bold]{device}[/] at {url}")
        onboard_started = time.perf_counter()
        with progress_bar() as progress:
            onboarding = client.onboard(device, SPACE, samples, seed=seed,
                                        on_progress=track(progress, f"onboard {device}"))
        console.print(f"onboarded with {samples} measurements in {time.perf_counter() - onboard_started:.0f} s: "
                      f"predictor {onboarding.predictor_id}")
        sampled = {job.architecture for job in client.jobs(device=device) if job.architecture is not None}
        keys = held_out_keys(sampled, check, seed)
        with progress_bar() as progress:
            jobs = client.measure(device, SPACE, keys, on_progress=track(progress, "measure held-out set"))
        done = {key: job for key, job in zip(keys, jobs) if job.status == "done" and job.latency_ms is not None}
        # the onboarded predictor: the held-out measurements re-adapt the device's predictor as they arrive
        prediction = client.predict(device, SPACE, list(done), onboarding.predictor_id)

    measured = np.asarray([job.latency_ms for job in done.values()], dtype=np.float64)
    predicted = np.asarray(prediction.latency_ms)
    # a flagged measurement's median is in doubt (the farm neither trains on nor reuses it): the
    # check is scored on all of them and on the trusted ones alone
    trusted = np.asarray([bool(job.valid) for job in done.values()], dtype=bool)
    overall, on_trusted = check_score(measured, predicted), check_score(measured[trusted], predicted[trusted])
    if overall is None:
        raise SystemExit(f"only {len(done)} of {len(keys)} held-out measurements finished: nothing to check against")
    plot = out / "demo_scatter.png"
    scatter_plot(plot, measured, predicted, trusted, f"{device}: rho={overall.rho:.3f}, MAPE={overall.mape:.1f}%")
    console.rule("result")
    console.print(f"held-out architectures measured: {len(done)} of {len(keys)}, {int(trusted.sum())} trusted "
                  f"({len(done) - int(trusted.sum())} flagged: their runs scattered or drifted on this host)")
    trusted_rho = f"{on_trusted.rho:.3f}" if on_trusted else "–"
    trusted_mape = f"{on_trusted.mape:.1f}%" if on_trusted else "–"
    console.print(f"Spearman rho (predicted vs measured): [bold]{overall.rho:.3f}[/]   trusted only: {trusted_rho}")
    console.print(f"mean absolute percentage error:       [bold]{overall.mape:.1f}%[/]   trusted only: {trusted_mape}")
    console.print(f"scatter plot: {plot.resolve()}")
    console.print(f"explore: LATFARM_DATABASE_URL={settings.database_url} latfarm server  → http://127.0.0.1:8000/docs")
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
