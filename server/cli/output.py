"""What every `latfarm` command shares: exit codes, error messages, `--json` output, progress.

Exit codes (README's CLI section has the same table):

====  ==============================================================================
code  meaning
====  ==============================================================================
0     success
1     unexpected error: a bug (with a traceback), or the server failed (HTTP 5xx)
2     usage error: an unknown option, a missing argument, options that do not fit
3     not found: an unknown device, predictor or file (HTTP 404)
4     conflict or not ready: e.g. no predictor serves the device yet, no reference
      data imported, an output folder made with other settings (HTTP 409)
5     invalid input: well-formed but rejected values, e.g. an invalid architecture
      key, an unknown space or task (HTTP 400, 413, 422)
6     not authorised: a missing or wrong token, or one without the scope (HTTP 401, 403)
7     unavailable: the server or the database cannot be reached, or asks to retry
      later (HTTP 429, 503); retrying may help
8     failed: the work ran and failed or timed out (an onboarding failed)
130   interrupted (Ctrl-C)
====  ==============================================================================

Results go to stdout (one JSON document with `--json`); messages, progress and errors go to
stderr, so `latfarm predict DEVICE --all --json | jq .latency_ms` works. A command reports an
error a user can act on (see `classify`) as one `error: ...` line, without a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import IntEnum
from typing import Annotated, Any, NoReturn

import httpx
import typer
from pydantic_core import to_jsonable_python
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from typer.core import TyperGroup


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    NOT_FOUND = 3
    CONFLICT = 4
    INVALID = 5
    UNAUTHORIZED = 6
    UNAVAILABLE = 7
    FAILED = 8
    INTERRUPTED = 130


#: the one-line summary of each code, for `latfarm --help`
EXIT_CODE_SUMMARY = {
    ExitCode.OK: "success", ExitCode.ERROR: "unexpected error", ExitCode.USAGE: "usage error",
    ExitCode.NOT_FOUND: "not found", ExitCode.CONFLICT: "conflict or not ready", ExitCode.INVALID: "invalid input",
    ExitCode.UNAUTHORIZED: "not authorised", ExitCode.UNAVAILABLE: "server or database unavailable",
    ExitCode.FAILED: "the work failed or timed out", ExitCode.INTERRUPTED: "interrupted",
}

#: messages, progress and errors; results go to stdout with `emit`
err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option(
    "--json", help="Print the result as one JSON document on stdout (messages and progress go to stderr).")]

_BY_STATUS = {
    400: ExitCode.INVALID, 401: ExitCode.UNAUTHORIZED, 403: ExitCode.UNAUTHORIZED, 404: ExitCode.NOT_FOUND,
    409: ExitCode.CONFLICT, 413: ExitCode.INVALID, 422: ExitCode.INVALID, 429: ExitCode.UNAVAILABLE,
    503: ExitCode.UNAVAILABLE,
}


def progress_bar() -> Progress:
    """A progress display on stderr, for work that takes more than a moment."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err, transient=False)


def track(progress: Progress, label: str) -> Callable[[int, int], None]:
    """A FarmClient `on_progress` callback drawing the bar `label` on `progress`."""
    task = progress.add_task(label, total=None)

    def update(finished: int, total: int) -> None:
        progress.update(task, completed=finished, total=total)

    return update


def examples(*lines: str) -> str:
    """A command's help epilog: an "Examples" section of command lines (`# ...` lines are comments)."""
    body = "\n".join(f"[dim]{escape(line)}[/]" if line.startswith("#") else escape(line) for line in lines)
    return f"[bold]Examples[/]\n\n{body}"


def emit(data: Any, as_json: bool, text: str) -> None:
    """A command's result on stdout: `data` as JSON (pydantic models, dataclasses, paths and
    datetimes included) with `--json`, else the human-readable `text`."""
    typer.echo(json.dumps(to_jsonable_python(data)) if as_json else text)


def fail(code: ExitCode, message: str) -> NoReturn:
    """End the command with `error: message` on stderr and the exit code `code`."""
    err.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def exit_code_for_status(status: int) -> ExitCode:
    """The exit code for an HTTP error status of the server."""
    return _BY_STATUS.get(status, ExitCode.INVALID if 400 <= status < 500 else ExitCode.ERROR)


def classify(exc: Exception) -> tuple[ExitCode, str] | None:
    """The exit code and message of an error a user can act on; None for anything else (a bug)."""
    # imported here: only a failing command pays for them
    from pydantic import ValidationError
    from sqlalchemy.exc import OperationalError

    from latfarm import FarmError
    from server.errors import ApiError

    if isinstance(exc, ApiError):  # the commands that work on the database directly
        return exit_code_for_status(exc.status_code), exc.detail
    if isinstance(exc, FarmError):  # the server answered an error; without a status, the work failed
        return ExitCode.FAILED if exc.status_code is None else exit_code_for_status(exc.status_code), str(exc)
    if isinstance(exc, httpx.TransportError):
        return ExitCode.UNAVAILABLE, f"cannot reach the server{_url_of(exc)}: {str(exc) or type(exc).__name__}"
    if isinstance(exc, FileNotFoundError):
        return ExitCode.NOT_FOUND, str(exc)
    if isinstance(exc, ValidationError):
        return ExitCode.INVALID, "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}" for e in exc.errors())
    if isinstance(exc, OperationalError):
        reason = str(exc.orig or exc).strip().partition("\n")[0]
        return ExitCode.UNAVAILABLE, f"database: {reason}"
    return None


def _url_of(exc: httpx.TransportError) -> str:
    try:
        return f" at {exc.request.url.copy_with(path='/', query=None)}"
    except RuntimeError:  # raised before a request was made
        return ""


class FarmGroup(TyperGroup):
    """A command group whose commands end with a one-line message and the exit code of the table
    above, instead of a traceback, on any error `classify` knows (and 130 on Ctrl-C).

    Given to the top `typer.Typer(cls=FarmGroup)`, it covers every command and sub-group."""

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            fail(ExitCode.INTERRUPTED, "interrupted")
        except Exception as exc:
            known = classify(exc)
            if known is None:
                raise
            fail(*known)
