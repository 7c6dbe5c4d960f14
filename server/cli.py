"""The `latfarm` command line."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from server.bench_cli import bench_app
from server.settings import get_settings

app = typer.Typer(no_args_is_help=True, help="Latency measurement farm and few-shot latency predictor for NAS.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
datasets_app = typer.Typer(no_args_is_help=True, help="Published reference latency tables.")
app.add_typer(db_app, name="db")
app.add_typer(datasets_app, name="datasets")
app.add_typer(bench_app, name="bench")
console = Console()
#: seconds an idle HTTP connection is kept open (uvicorn closes them after 5 s by default)
KEEP_ALIVE_S = 75


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply all migrations (alembic upgrade head) to LATFARM_DATABASE_URL."""
    from server.db import upgrade

    upgrade(get_settings().database_url)
    console.print("database is at the latest schema")


@datasets_app.command("import")
def datasets_import(
    path: Annotated[Optional[Path], typer.Argument(help="datasets folder; default LATFARM_DATASETS")] = None,
) -> None:
    """Load devices, architectures and latencies of the published tables (idempotent)."""
    from server.services.runtime import import_reference_datasets

    settings = get_settings()
    root = path or settings.datasets
    if root is None:
        raise typer.BadParameter("no datasets folder: pass PATH or set LATFARM_DATASETS")
    with progress_bar() as progress:
        report = import_reference_datasets(settings, root, progress)
    console.print(
        f"imported {report.measurements_inserted:,} measurements, {report.architectures_created:,} architectures, "
        f"{report.devices_created} new devices ({report.devices_skipped} device tables already complete)"
    )


@app.command()
def pretrain(
    space: Annotated[str, typer.Option(help="search space")] = "nb201",
    device: Annotated[Optional[list[str]], typer.Option(help="reference device to train on (repeat); default all")] = None,
    seed: int = 0,
) -> None:
    """Pre-train a base predictor on the imported reference devices of a space."""
    from server.services.runtime import pretrain_base

    settings = get_settings()
    with progress_bar() as progress:
        row = pretrain_base(settings, space, device, seed, progress)
    console.print(f"base predictor {row.id} (v{row.version}) for {space} on {len(row.training_devices)} devices, "
                  f"{row.metrics['train_seconds']} s")


@app.command()
def predict(
    device: str,
    space: Annotated[str, typer.Option(help="search space")] = "nb201",
    arch: Annotated[Optional[list[str]], typer.Option(help="architecture key (repeat)")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every architecture of the space")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Predict latencies on a device with its newest predictor."""
    from server.services.runtime import predict_latencies

    if not all_ and not arch:
        raise typer.BadParameter("give --arch KEY (repeatable) or --all")
    result = predict_latencies(get_settings(), device, space, "all" if all_ else list(arch or []))
    if as_json:
        typer.echo(result.model_dump_json())
        return
    console.print(f"predictor {result.predictor_id} v{result.predictor_version} ({result.predictor_kind.value})")
    for key, ms, std in zip(result.architectures, result.latency_ms, result.uncertainty_ms):
        console.print(f"{ms:10.3f} ms ± {std:7.3f}  {key}")


@app.command()
def onboard(
    device: str,
    samples: Annotated[int, typer.Option(help="architectures to measure")] = 20,
    sampler: Annotated[str, typer.Option(help="sampler name")] = "default",
    space: Annotated[str, typer.Option(help="search space")] = "nb201",
    server: Annotated[str, typer.Option(envvar="LATFARM_SERVER", help="server URL")] = "http://127.0.0.1:8000",
    token: Annotated[str, typer.Option(envvar="LATFARM_TOKEN", help="admin token, or a client token with the submit "
                                       "and read scopes")] = "",
) -> None:
    """Onboard a device served by a running agent: measure sampled architectures, adapt a predictor."""
    from server.client import FarmClient

    with FarmClient(server, token or None) as client, progress_bar() as progress:
        result = client.onboard(device, space, samples, sampler, progress)
    console.print_json(json.dumps(result))


@app.command()
def server(
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="server processes (Postgres only; SQLite takes one)")] = 1,
    access_log: Annotated[bool, typer.Option(help="log every request")] = True,
) -> None:
    """Run the API server (migrating an embedded SQLite database first).

    Settings come from LATFARM_* variables, e.g.
    `LATFARM_DATABASE_URL=postgresql://latfarm@db/latfarm latfarm server --host 0.0.0.0 --workers 2`.
    """
    import uvicorn

    from server.db import upgrade
    from server.logs import configure_logging

    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    if settings.is_sqlite:
        upgrade(settings.database_url)
        workers = 1
    # every worker process builds its app from the same LATFARM_* environment; idle connections
    # stay open well past a poll interval, so agents and clients reuse them instead of racing a close
    uvicorn.run("server.app:create_app", factory=True, host=host, port=port, workers=workers, log_level="info",
                log_config=None, access_log=access_log, timeout_keep_alive=KEEP_ALIVE_S,
                limit_concurrency=settings.max_concurrency)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="folder for the database, artifacts and the plot")] = Path("latfarm-demo"),
    samples: Annotated[int, typer.Option(help="measurements used to adapt the predictor")] = 20,
    check: Annotated[int, typer.Option(help="held-out architectures measured to check it")] = 100,
    seed: int = 0,
) -> None:
    """The whole loop on this machine: import, pre-train, onboard this CPU, check against real runs."""
    from server.demo import run_demo

    run_demo(out, samples=samples, check=check, seed=seed, console=console)


def main() -> None:
    from server.client import FarmError
    from server.errors import ApiError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except (ApiError, FarmError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
