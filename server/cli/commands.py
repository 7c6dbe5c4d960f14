"""The `latfarm` command line.

Every command exits with a code of the table in `server.cli.output`, prints its result on stdout
(one JSON document with `--json`) and messages and progress on stderr.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from agent.protocol import Runtime
from server.cli.bench import bench_app
from server.cli.output import EXIT_CODE_SUMMARY, FarmGroup, JsonFlag, emit, examples, progress_bar, track

if TYPE_CHECKING:
    from server.settings import Settings

app = typer.Typer(
    cls=FarmGroup, no_args_is_help=True,
    help="Latency measurement farm and few-shot latency predictor for NAS.\n\n"
    "Results go to stdout (JSON with --json), messages and progress to stderr. Exit codes: "
    + ", ".join(f"{code.value} {summary}" for code, summary in EXIT_CODE_SUMMARY.items()) + ".",
    epilog=examples(
        "# the whole loop on this machine",
        "latfarm demo",
        "# set up a farm, then predict for a device the reference tables cover",
        "latfarm datasets import && latfarm pretrain --space nb201",
        "latfarm predict titan_rtx_256 --space nb201 --all --json | jq '.latency_ms | max'",
        "# onboard a device a running agent serves",
        "latfarm onboard rpi4-ort-1t-b1 --samples 20 --server http://farm:8000 --token $LATFARM_TOKEN",
    ),
)
db_app = typer.Typer(no_args_is_help=True, help="Database schema.", epilog=examples("latfarm db upgrade"))
datasets_app = typer.Typer(no_args_is_help=True, help="Published reference latency tables.",
                           epilog=examples("latfarm datasets import"))
app.add_typer(db_app, name="db")
app.add_typer(datasets_app, name="datasets")
app.add_typer(bench_app, name="bench")
#: seconds an idle HTTP connection is kept open (uvicorn closes them after 5 s by default)
KEEP_ALIVE_S = 75


def settings_from_env() -> Settings:
    """The LATFARM_* settings, imported on first use: they load torch, which `--help` and the
    commands that only talk to a server do without."""
    from server.settings import get_settings

    return get_settings()


@db_app.command("upgrade", epilog=examples(
    "latfarm db upgrade",
    "LATFARM_DATABASE_URL=postgresql://latfarm@db/latfarm latfarm db upgrade --json",
))
def db_upgrade(as_json: JsonFlag = False) -> None:
    """Apply all migrations (alembic upgrade head) to LATFARM_DATABASE_URL."""
    from alembic.script import ScriptDirectory
    from sqlalchemy import make_url

    from server.db import alembic_config, upgrade

    url = settings_from_env().database_url
    upgrade(url)
    revision = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    emit({"database_url": make_url(url).render_as_string(hide_password=True), "revision": revision}, as_json,
         f"database is at the latest schema ({revision})")


@datasets_app.command("import", epilog=examples(
    "latfarm datasets import",
    "latfarm datasets import ./my-tables --json | jq .measurements_inserted",
    "latfarm datasets import --space nb201",
))
def datasets_import(
    path: Annotated[Path | None, typer.Argument(
        help="tables folder; default LATFARM_DATASETS, else the tables shipped with latfarm")] = None,
    space: Annotated[list[str] | None, typer.Option(
        help="import only this space's tables (repeatable); default every space that has tables")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Load devices, architectures and latencies of the published tables (idempotent)."""
    from server.services.runtime import import_reference_datasets

    settings = settings_from_env()
    root = path or settings.datasets
    with progress_bar() as progress:
        report = import_reference_datasets(settings, root, progress, tuple(space) if space else None)
    emit(report, as_json,
         f"imported {report.measurements_inserted:,} measurements, {report.architectures_created:,} architectures, "
         f"{report.devices_created} new devices ({report.devices_skipped} device tables already complete)")


@app.command(epilog=examples(
    "latfarm pretrain --space nb201",
    "latfarm pretrain --space fbnet --device titan_rtx_1 --device pixel3 --json | jq .id",
))
def pretrain(
    space: Annotated[str, typer.Option(help="search space")] = "nb201",
    device: Annotated[list[str] | None, typer.Option(help="reference device to train on (repeat); default all")] = None,
    seed: int = 0,
    as_json: JsonFlag = False,
) -> None:
    """Pre-train a base predictor on the imported reference devices of a space."""
    from server.api.predictors import predictor_out
    from server.db import make_engine, make_session_factory, session_scope
    from server.models import Predictor
    from server.services.runtime import pretrain_base

    settings = settings_from_env()
    with progress_bar() as progress:
        row = pretrain_base(settings, space, device, seed, progress)
    with session_scope(make_session_factory(make_engine(settings.database_url))) as session:
        result = predictor_out(session.get_one(Predictor, row.id))  # as GET /predictors/{id} shows it
    emit(result, as_json, f"base predictor {result.id} (v{result.version}) for {space} on "
         f"{len(result.training_devices)} devices, {result.metrics['train_seconds']} s")


@app.command(epilog=examples(
    "KEY='|nor_conv_3x3~0|+|none~0|skip_connect~1|+|nor_conv_1x1~0|none~1|avg_pool_3x3~2|'",
    "latfarm predict titan_rtx_256 --arch \"$KEY\"",
    "latfarm predict titan_rtx_256 --all --json > titan_rtx_256.json",
    "latfarm predict pixel3 --space fbnet --arch \"$KEY1\" --arch \"$KEY2\" --json | jq .latency_ms",
    "latfarm predict titan_rtx_1 --onnx resnet18.onnx --onnx mobilenet_v2.onnx   # any ONNX model",
    "latfarm predict my-cpu --collection candidates --json",
))
def predict(
    device: str,
    space: Annotated[str, typer.Option(help="search space")] = "nb201",
    arch: Annotated[list[str] | None, typer.Option(help="architecture key (repeat)")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every architecture of the space")] = False,
    onnx: Annotated[list[Path] | None, typer.Option(help="an ONNX model file to upload and predict (repeat); "
                                                       "space onnx", exists=True, dir_okay=False)] = None,
    collection: Annotated[str | None, typer.Option(help="every member of a collection; space onnx")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Predict latencies (ms, with uncertainty) on a device with its newest predictor."""
    from server.services.runtime import predict_latencies, upload_models

    targets = sum(bool(given) for given in (all_, arch, onnx, collection))
    if targets != 1:
        raise typer.BadParameter("give one of --arch KEY (repeatable), --all, --onnx FILE (repeatable), --collection")
    settings = settings_from_env()
    if onnx or collection:
        keys = upload_models(settings, [path.read_bytes() for path in onnx]) if onnx else None
        result = predict_latencies(settings, device, "onnx", keys, collection)
    else:
        result = predict_latencies(settings, device, space, "all" if all_ else list(arch or []))
    rows = (f"{ms:10.3f} ms ± {std:7.3f}  {key}"
            for key, ms, std in zip(result.architectures, result.latency_ms, result.uncertainty_ms))
    emit(result, as_json, "\n".join(
        [f"predictor {result.predictor_id} v{result.predictor_version} ({result.predictor_kind.value})", *rows]))


@app.command(epilog=examples(
    "latfarm onboard rpi4-ort-1t-b1 --samples 20 --server http://farm:8000 --token $LATFARM_TOKEN",
    "LATFARM_SERVER=http://farm:8000 latfarm onboard rpi4-ort-1t-b1 --sampler kmeans --json | jq .predictor_id",
    "# active learning: 20 first, then the least certain 5 at a time, up to 40 or 5 % mean uncertainty",
    "latfarm onboard rpi4-ort-1t-b1 --samples 20 --budget 40 --target-uncertainty 0.05",
))
def onboard(
    device: str,
    samples: Annotated[int, typer.Option(help="architectures to measure")] = 20,
    sampler: Annotated[str, typer.Option(help="sampler name")] = "default",
    space: Annotated[str, typer.Option(help="search space")] = "nb201",
    budget: Annotated[int | None, typer.Option(help="active learning: measure the least certain architectures "
                                                  "after the first SAMPLES, up to this many in all")] = None,
    target_uncertainty: Annotated[float | None, typer.Option(
        help="stop active learning once the mean relative uncertainty over the space is at most this")] = None,
    server: Annotated[str, typer.Option(envvar="LATFARM_SERVER", help="server URL")] = "http://127.0.0.1:8000",
    token: Annotated[str, typer.Option(envvar="LATFARM_TOKEN", help="admin token, or a client token with the submit "
                                       "and read scopes")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Onboard a device served by a running agent: measure sampled architectures, adapt a predictor.

    Waits until the predictor is ready; exits 8 when the onboarding failed.
    """
    from latfarm import FarmClient

    with FarmClient(server, token or None) as client, progress_bar() as progress:
        result = client.onboard(device, space, samples, sampler, budget=budget, target_uncertainty=target_uncertainty,
                                on_progress=track(progress, f"onboard {device}"))
    emit(result, as_json, f"onboarding {result.id}: {device} is served by predictor {result.predictor_id} "
         f"({result.jobs_done} of {result.jobs_total} measurements)")


@app.command(epilog=examples(
    "latfarm spaces",
    "latfarm spaces --json | jq '.[] | select(.base_predictor_id == null) | .name'",
))
def spaces(as_json: JsonFlag = False) -> None:
    """The installed search spaces: size, key format, reference devices, base predictor.

    Lists latfarm's own spaces and those of installed packages (entry-point group latfarm.spaces)."""
    from server.services.runtime import describe_spaces

    result = describe_spaces(settings_from_env())
    lines = [f"{s.name:8} {_count(s.size):>26}  "
             f"{len(s.reference_devices):3} reference devices  "
             f"{'base predictor ' + str(s.base_predictor_id) if s.base_predictor_id else 'no base predictor'}"
             f"{'  (graph-encoded)' if s.graph_encoded else ''}\n         key: {s.key_format}" for s in result]
    emit(result, as_json, "\n".join(lines))


def _count(size: int | None) -> str:
    if size is None:
        return "unbounded"
    return f"{size:,} architectures" if size < 10**9 else f"{size:.2e} architectures"


@app.command(epilog=examples(
    "latfarm explain rpi4-ort-1t-b1",
    "latfarm explain rpi4-ort-1t-b1 --space nb201 --json | jq '.resembles[0].device'",
))
def explain(
    device: str,
    space: Annotated[str, typer.Option(help="search space")] = "nb201",
    top: Annotated[int, typer.Option(min=1, help="reference devices shown (all with --json)")] = 5,
    as_json: JsonFlag = False,
) -> None:
    """Which reference devices an adapted device resembles, and what each operation costs on it."""
    from server.services.runtime import explain_device

    result = explain_device(settings_from_env(), device, space)
    lines = [f"predictor {result.predictor_id}, over {result.architectures} architectures of {space}",
             "most like (rank correlation of predicted latencies, weight in the fit):",
             *(f"  {r.device:45} rho {r.spearman:+.3f}  weight {r.weight:+.3f}" for r in result.resembles[:top]),
             "cost of an operation instead of the cheapest, here vs the reference devices' average:",
             *(f"  {c.op:20} {c.effect_pct:+7.1f} %   vs {c.reference_effect_pct:+7.1f} %" for c in result.op_costs)]
    emit(result, as_json, "\n".join(lines))


@app.command(epilog=examples(
    "latfarm server",
    "LATFARM_DATABASE_URL=postgresql://latfarm@db/latfarm latfarm server --host 0.0.0.0 --workers 2",
))
def server(
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="server processes (Postgres only; SQLite takes one)")] = 1,
    access_log: Annotated[bool, typer.Option(help="log every request")] = True,
) -> None:
    """Run the API server (migrating an embedded SQLite database first); settings come from LATFARM_* variables."""
    import uvicorn

    from server.db import upgrade
    from server.logs import configure_logging

    settings = settings_from_env()
    configure_logging(settings.log_format, settings.log_level)
    if settings.is_sqlite:
        upgrade(settings.database_url)
        workers = 1
    # every worker process builds its app from the same LATFARM_* environment; idle connections
    # stay open well past a poll interval, so agents and clients reuse them instead of racing a close
    uvicorn.run("server.app:create_app", factory=True, host=host, port=port, workers=workers, log_level="info",
                log_config=None, access_log=access_log, timeout_keep_alive=KEEP_ALIVE_S,
                limit_concurrency=settings.max_concurrency)


@app.command(epilog=examples(
    "# beside servers started with LATFARM_WORKER=false, sharing their Postgres",
    "LATFARM_DATABASE_URL=postgresql://latfarm@db/latfarm latfarm worker",
))
def worker() -> None:
    """Run a training worker: pre-training and adaptation tasks from the database.

    Takes them one at a time until interrupted. `latfarm server` runs one in each of its processes
    unless LATFARM_WORKER=false."""
    from server.background.training_worker import TrainingWorker
    from server.db import make_engine, make_session_factory, upgrade
    from server.logs import configure_logging
    from server.services.answer_cache import PredictorCache

    settings = settings_from_env()
    configure_logging(settings.log_format, settings.log_level)
    if settings.is_sqlite:
        upgrade(settings.database_url)
    cache = PredictorCache(torch_threads=settings.torch_threads)
    TrainingWorker(make_session_factory(make_engine(settings.database_url)), cache, settings).run_forever()


@app.command(epilog=examples(
    "latfarm demo",
    "latfarm demo --out /tmp/demo --samples 10 --check 50",
    "latfarm demo --runtime openvino --check 50",
))
def demo(
    out: Annotated[Path, typer.Option(help="folder for the database, artifacts and the plot")] = Path("latfarm-demo"),
    samples: Annotated[int, typer.Option(help="measurements used to adapt the predictor")] = 20,
    check: Annotated[int, typer.Option(help="held-out architectures measured to check it")] = 100,
    seed: int = 0,
    runtime: Annotated[Runtime, typer.Option(help="the runtime the agent measures with (installed here)")]
    = Runtime.onnxruntime,
) -> None:
    """The whole loop on this machine: import, pre-train, onboard this CPU, check against real runs."""
    from server.cli.demo import run_demo

    run_demo(out, samples=samples, check=check, seed=seed, console=Console(), runtime=runtime)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
