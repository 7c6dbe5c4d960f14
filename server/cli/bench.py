"""`latfarm bench`: the few-shot latency prediction bench (wired in with
`app.add_typer(bench_app, name="bench")`)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated

import typer

from server.cli.output import ExitCode, JsonFlag, emit, examples, fail, progress_bar

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks against the published state of the art.",
                        epilog=examples("latfarm bench predictor --quick"))

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


def _names(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


def _cell(value: str) -> int | float | str | None:
    """A summary.csv cell as JSON: a number, text, or null when empty."""
    if not value:
        return None
    for number in (int, float):
        try:
            return number(value)
        except ValueError:
            pass
    return value


def _summary(path: Path) -> list[dict[str, int | float | str | None]]:
    with open(path, newline="") as handle:
        return [{column: _cell(cell) for column, cell in row.items()} for row in csv.DictReader(handle)]


@bench_app.command(
    "predictor",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": False},
    epilog=examples(
        "# a smoke run in a few minutes (docs/bench/quick)",
        "latfarm bench predictor --quick",
        "latfarm bench predictor --tasks N0,F3 --k 5 10 20 --seeds 3 --threads 1",
        "latfarm bench predictor --quick --json | jq '.summary[] | {task, ours_k20, nasflat}'",
        "# every NB201 and FBNet device held out in turn, k 5 10 20 50 (resumable)",
        "latfarm bench predictor --lodo --threads 1",
    ),
)
def predictor(
    ctx: typer.Context,
    tasks: Annotated[str | None, typer.Option(help="comma-separated tasks, e.g. N0,F3; default all twelve")] = None,
    k: Annotated[list[str] | None, typer.Option("--k", help="measured samples per device: --k 5 10 20")] = None,
    seeds: Annotated[int, typer.Option(help="seeds per (device, k)")] = 3,
    methods: Annotated[str | None, typer.Option(help="comma-separated methods; default all")] = None,
    out: Annotated[Path | None, typer.Option(
        help="output folder; default docs/bench (docs/bench/quick with --quick)")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="smoke run: N0, k 5 and 20, one seed, cheap pre-training")] = False,
    fresh: Annotated[bool, typer.Option(
        "--fresh", help="discard the rows already in --out instead of resuming")] = False,
    threads: Annotated[int | None, typer.Option(
        help="torch CPU threads (1 is fastest on a busy machine); default torch's")] = None,
    lodo: Annotated[bool, typer.Option("--lodo", help=(
        "leave-one-device-out bench over the NB201 and FBNet reference devices instead "
        "(default --k 5 10 20 50; --tasks names spaces)"))] = False,
    devices: Annotated[str | None, typer.Option(
        help="with --lodo: comma-separated target devices; default all")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Few-shot latency prediction on the MLSys 2024 tasks: ours vs baselines vs published NASFLAT.

    Writes predictor.csv (raw rows, resumable), diagnostics.csv, summary.csv, predictor.md and
    predictor.png to --out, and prints predictor.md (with --json: the counts and summary.csv's rows).
    """
    from predictor.bench import BenchMismatch, run_bench

    ks = _ints([*(k or []), *ctx.args], "--k") or ([5, 10, 20, 50] if lodo else [5, 10, 20])
    if seeds < 1:
        raise typer.BadParameter("--seeds must be at least 1")
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads))
    out_dir = out or (QUICK_OUT if quick else DEFAULT_OUT)
    if lodo:
        _lodo(_names(tasks), _names(devices), ks, seeds, out_dir, fresh, as_json)
        return
    with progress_bar() as bar:
        job = bar.add_task("loading", total=None)

        def report(done: int, total: int, description: str) -> None:
            bar.update(job, completed=done, total=total or None, description=description)

        try:
            result = run_bench(_names(tasks), ks, seeds, _names(methods), out_dir, quick, report, fresh=fresh)
        except BenchMismatch as exc:
            fail(ExitCode.CONFLICT, str(exc))
        except ValueError as exc:  # an unknown task or method, a k below 2
            fail(ExitCode.INVALID, str(exc))
    counts = (f"{result.rows_written} rows written, {result.rows_skipped} already there; "
              f"pre-trained {', '.join(result.tasks_pretrained) or 'nothing'}")
    emit({**vars(result), "summary": _summary(result.out_dir / "summary.csv")}, as_json,
         f"{counts}\n{(result.out_dir / 'predictor.md').read_text()}")


@bench_app.command(
    "cross-space",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": False},
    epilog=examples(
        "latfarm bench cross-space                       # both held-out spaces, both scenarios, k 5 10 20 50",
        "latfarm bench cross-space --held-out fbnet --scenarios space_unseen --k 20 --seeds 1",
        "latfarm bench cross-space --devices pixel3,raspi4 --archs-per-space 100",
    ),
)
def cross_space(
    ctx: typer.Context,
    held_out: Annotated[str, typer.Option(help="comma-separated spaces held out in turn")] = "fbnet,nb201",
    scenarios: Annotated[str, typer.Option(help="space_unseen and/or both_unseen")] = "space_unseen,both_unseen",
    k: Annotated[list[str] | None, typer.Option("--k", help="samples of the held-out space per device")] = None,
    seeds: Annotated[int, typer.Option(help="seeds per (device, k)")] = 3,
    archs_per_space: Annotated[int, typer.Option(help="architectures of each space's table exported to ONNX")] = 250,
    devices: Annotated[str | None, typer.Option(help="comma-separated target devices; default all")] = None,
    out: Annotated[Path, typer.Option(help="output folder")] = DEFAULT_OUT,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads; default torch's")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Transfer to an unseen search space: the onnx predictor against a FLOPs ridge and in-space.

    The graph-level (onnx) predictor is pre-trained on the other spaces and adapted from k samples
    of the held-out one; a FLOPs ridge on the same samples and the in-space predictor run beside it.

    Writes cross_space.csv (raw rows, resumable) and cross_space.md to --out and prints the latter.
    """
    from predictor.graph.bench import DEFAULT_KS, REPORT_FILE, run_cross_space

    ks = _ints([*(k or []), *ctx.args], "--k") or list(DEFAULT_KS)
    if seeds < 1 or min(ks) < 2:
        raise typer.BadParameter("--seeds must be at least 1 and every --k at least 2")
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads))
    with progress_bar() as bar:
        job = bar.add_task("loading", total=None)
        try:
            written = run_cross_space(out, held_out=_names(held_out) or [], scenarios=_names(scenarios) or [],
                                      ks=ks, seeds=seeds, archs_per_space=archs_per_space, devices=_names(devices),
                                      progress=lambda description: bar.update(job, description=description))
        except ValueError as exc:
            fail(ExitCode.INVALID, str(exc))
    emit({"rows_written": written, "out_dir": str(out)}, as_json,
         f"{written} rows written\n{(out / REPORT_FILE).read_text()}")


def _lodo(spaces: list[str] | None, devices: list[str] | None, ks: list[int], seeds: int, out_dir: Path,
          fresh: bool, as_json: bool) -> None:
    from predictor.bench.lodo import RAW_FILE, SPACES, run_lodo
    from predictor.bench.lodo_report import MARKDOWN_FILE

    if fresh:
        (out_dir / RAW_FILE).unlink(missing_ok=True)
    with progress_bar() as bar:
        job = bar.add_task("loading", total=None)

        def report(done: int, total: int, description: str) -> None:
            bar.update(job, completed=done, total=total or None, description=description)

        try:
            result = run_lodo(spaces or SPACES, devices, ks, seeds, out_dir=out_dir, progress=report)
        except ValueError as exc:  # an unknown space, a k below 2
            fail(ExitCode.INVALID, str(exc))
    emit({"out_dir": str(result.out_dir), "rows_written": result.rows_written, "devices": result.devices}, as_json,
         f"{result.rows_written} rows written\n{(result.out_dir / MARKDOWN_FILE).read_text()}")
