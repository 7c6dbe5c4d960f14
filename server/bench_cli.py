"""`latfarm bench`: the few-shot latency prediction bench (wired in with
`app.add_typer(bench_app, name="bench")`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks against the published state of the art.")
console = Console()

DEFAULT_OUT = Path("docs/bench")
QUICK_OUT = DEFAULT_OUT / "quick"


def _ints(values: list[str], option: str) -> list[int]:
    """`--k 5 10 20`, `--k 5 --k 10` and `--k 5,10,20` alike."""
    out = []
    for value in values:
        for part in value.replace(",", " ").split():
            try:
                out.append(int(part))
            except ValueError:
                raise typer.BadParameter(f"{option} takes integers, got {part!r}") from None
    return out


def _names(value: Optional[str]) -> Optional[list[str]]:
    if not value:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


@bench_app.command(
    "predictor",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": False},
)
def predictor(
    ctx: typer.Context,
    tasks: Annotated[Optional[str], typer.Option(help="comma-separated tasks, e.g. N0,F3; default all twelve")] = None,
    k: Annotated[Optional[list[str]], typer.Option("--k", help="measured samples per device: --k 5 10 20")] = None,
    seeds: Annotated[int, typer.Option(help="seeds per (device, k)")] = 3,
    methods: Annotated[Optional[str], typer.Option(help="comma-separated methods; default all")] = None,
    out: Annotated[Optional[Path], typer.Option(help="output folder; default docs/bench (docs/bench/quick with --quick)")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="smoke run: N0, k 5 and 20, one seed, cheap pre-training")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="discard the rows already in --out instead of resuming")] = False,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (1 is fastest on a busy machine); default torch's")] = None,
) -> None:
    """Few-shot latency prediction on the MLSys 2024 tasks: ours vs baselines vs published NASFLAT.

    Writes predictor.csv (raw rows, resumable), diagnostics.csv, summary.csv, predictor.md and
    predictor.png to --out.
    """
    from predictor.bench import BenchMismatch, run_bench

    ks = _ints([*(k or []), *ctx.args], "--k") or [5, 10, 20]
    if seeds < 1:
        raise typer.BadParameter("--seeds must be at least 1")
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads))
    out_dir = out or (QUICK_OUT if quick else DEFAULT_OUT)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        job = bar.add_task("loading", total=None)

        def report(done: int, total: int, description: str) -> None:
            bar.update(job, completed=done, total=total or None, description=description)

        try:
            result = run_bench(_names(tasks), ks, seeds, _names(methods), out_dir, quick, report, fresh=fresh)
        except (BenchMismatch, ValueError) as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from exc
    console.print(f"{result.rows_written} rows written, {result.rows_skipped} already there; "
                  f"pre-trained {', '.join(result.tasks_pretrained) or 'nothing'}")
    console.print((result.out_dir / "predictor.md").read_text(), markup=False, soft_wrap=True, highlight=False)
