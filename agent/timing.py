"""Time one model in a child process, with one of the runtimes of `agent.runtimes`.

The parent (`measure`) starts `python -m agent.timing` in its own session, writes a
`TimingRequest` as JSON to its stdin and reads one `ChildReport` as JSON from its stdout. A child
that runs past `timeout_s`, or whose job is cancelled, is killed. Running the measurement in a
fresh process keeps a crashing or hanging model from taking the agent down, lets the child be
pinned to its own CPUs, and gives every measurement the same clean process state. Only the child
imports the runtime.

The child dies with its parent, so that an agent killed outright (SIGKILL, OOM killer) leaves no
measurement running beside the next agent's: on Linux the kernel kills it (PR_SET_PDEATHSIG);
everywhere, a watchdog thread exits when the pipe whose write end only the parent holds reaches
end of file.

The child times the model load and the first inference apart, warms up until the run time is
stable (`warm_up`), then times at least `min_runs` runs and `min_seconds` seconds, at most
`max_runs` (`TimingProtocol`). A failure is reported with its class: `runtime_unavailable`,
`load_error`, `unsupported_op`, `out_of_memory` or `runtime_error`; the parent adds
`run_timeout` and `cancelled` when it kills the child.

In the child, stdout is redirected to stderr before the runtime is imported, so native log lines
cannot corrupt the report; the report goes to a duplicate of the original stdout.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from agent.protocol import LatencyStats, Runtime, TimingProtocol
from agent.runtimes import LoadSettings, RuntimeUnavailable, load_backend
from agent.runtimes.base import Execution

DEFAULT_SEED = 0
_POLL_S = 0.05
_STDERR_TAIL = 4000

FAILURE_RUN_TIMEOUT = "run_timeout"
FAILURE_CANCELLED = "cancelled"
FAILURE_RUNTIME_UNAVAILABLE = "runtime_unavailable"
FAILURE_LOAD = "load_error"
FAILURE_UNSUPPORTED_OP = "unsupported_op"
FAILURE_OUT_OF_MEMORY = "out_of_memory"
FAILURE_RUNTIME = "runtime_error"

#: lower-case fragments of error messages that mean the runtime has no kernel for an operator
_UNSUPPORTED_MARKERS = ("not_implemented", "could not find an implementation for", "unsupported operator")
#: lower-case fragments of error messages that mean an allocation failed
_OUT_OF_MEMORY_MARKERS = ("bad_alloc", "failed to allocate", "out of memory", "can't allocate memory")
#: environment variables that hand the child its parent's pid and the watchdog pipe's read end
_PARENT_ENV = "LATFARM_TIMING_PARENT"
_WATCHDOG_ENV = "LATFARM_TIMING_WATCHDOG_FD"
_PR_SET_PDEATHSIG = 1


class TimingRequest(BaseModel):
    """What the parent asks the child to do."""

    model_path: str
    runtime: Runtime = Runtime.onnxruntime
    provider: str | None = None
    threads: int = Field(ge=1)
    protocol: TimingProtocol
    cpus: list[int] | None = None
    seed: int = DEFAULT_SEED
    engine_cache_dir: str | None = None


class ChildReport(BaseModel):
    """What the child reports back (timings in milliseconds). `execution` holds the runtime's
    settings the measurement ran under (threads, execution mode, ...)."""

    ok: bool
    failure_class: str | None = None
    error: str | None = None
    samples_ms: list[float] = Field(default_factory=list)
    load_ms: float | None = None
    engine_build_ms: float | None = None
    first_inference_ms: float | None = None
    warmup_runs: int | None = None
    affinity: list[int] | None = None
    runtime_version: str | None = None
    providers: list[str] = Field(default_factory=list)
    execution: Execution = Field(default_factory=dict)
    inputs: dict[str, list[int]] = Field(default_factory=dict)


class TimingOutcome(ChildReport):
    """The result of `measure`, ready to be turned into a JobResult."""

    stats: LatencyStats | None = None
    wall_s: float = 0.0
    pid: int | None = None
    returncode: int | None = None


# --------------------------------------------------------------------------------------- stats


def compute_stats(samples_ms: list[float] | np.ndarray) -> LatencyStats:
    """Summary of timed runs. p99 only from 100 samples on; CV = std/mean (sample std, ddof=1)."""
    x = np.asarray(samples_ms, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no samples")
    n = int(x.size)
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else 0.0
    q25, median, q75, p90 = (float(v) for v in np.percentile(x, [25, 50, 75, 90]))
    return LatencyStats(
        n=n,
        median_ms=median,
        mean_ms=mean,
        min_ms=float(x.min()),
        max_ms=float(x.max()),
        p90_ms=p90,
        p99_ms=float(np.percentile(x, 99)) if n >= 100 else None,
        iqr_ms=max(0.0, q75 - q25),
        cv=std / mean if mean > 0 else 0.0,
    )


# -------------------------------------------------------------------------------------- parent


def choose_cpus(threads: int) -> list[int] | None:
    """`threads` CPUs to pin the child to, or None where the OS has no affinity API.

    Takes the highest-numbered CPUs this process may use (CPU 0 usually carries more
    interrupt and housekeeping load); all of them when fewer than `threads` are allowed.
    """
    if not hasattr(os, "sched_getaffinity"):
        return None
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except OSError:
        return None
    if not allowed:
        return None
    return allowed[-threads:] if threads < len(allowed) else allowed


def _child_command(watchdog_fd: int) -> tuple[list[str], dict[str, str], str]:
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env[_PARENT_ENV] = str(os.getpid())
    env[_WATCHDOG_ENV] = str(watchdog_fd)
    # cwd = the package root, so `-m agent.timing` cannot pick up a stray `agent` elsewhere.
    return [sys.executable, "-m", "agent.timing"], env, package_root


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            if hasattr(os, "killpg"):
                os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own process group
            else:
                proc.kill()
        except OSError:
            proc.kill()
    try:
        proc.communicate(timeout=10)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        proc.wait()


def _exit_description(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


def measure(
    model_path: str | os.PathLike[str],
    protocol: TimingProtocol,
    threads: int,
    *,
    runtime: Runtime = Runtime.onnxruntime,
    provider: str | None = None,
    cpus: list[int] | None | bool = True,
    cancel: threading.Event | None = None,
    seed: int = DEFAULT_SEED,
    timeout_s: float | None = None,
    engine_cache_dir: str | os.PathLike[str] | None = None,
) -> TimingOutcome:
    """Time `model_path` with `runtime` in a child process; never raises for model or child
    failures. `provider` is the ONNX Runtime execution provider (None: the CPU provider);
    `engine_cache_dir` the folder GPU runtimes cache their engines in.

    `cpus`: True pins to `choose_cpus(threads)`, a list pins to those CPUs, None/False does not
    pin. The child is killed after `timeout_s` (default `protocol.timeout_s`, counting model load)
    or as soon as `cancel` is set; the outcome then has failure_class "run_timeout" / "cancelled".
    """
    pin = choose_cpus(threads) if cpus is True else (list(cpus) if cpus else None)
    request = TimingRequest(
        model_path=str(Path(model_path).resolve()), runtime=runtime, provider=provider, threads=threads,
        protocol=protocol, cpus=pin, seed=seed,
        engine_cache_dir=str(Path(engine_cache_dir).resolve()) if engine_cache_dir is not None else None,
    )
    limit = protocol.timeout_s if timeout_s is None else timeout_s
    watchdog_read, watchdog_write = os.pipe()  # the write end stays here: its EOF means this process died
    cmd, env, cwd = _child_command(watchdog_read)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            pass_fds=(watchdog_read,),
            start_new_session=True,  # a terminal Ctrl-C reaches the agent, which decides; not the child
        )
    except BaseException:
        os.close(watchdog_write)
        raise
    finally:
        os.close(watchdog_read)
    stdout = stderr = b""
    killed_for: str | None = None
    try:
        payload: bytes | None = request.model_dump_json().encode()
        while True:
            try:
                stdout, stderr = proc.communicate(input=payload, timeout=_POLL_S)
                break
            except subprocess.TimeoutExpired:
                payload = None  # already handed over; communicate() keeps feeding it
            if cancel is not None and cancel.is_set():
                killed_for = FAILURE_CANCELLED
            elif time.monotonic() - started > limit:
                killed_for = FAILURE_RUN_TIMEOUT
            if killed_for:
                _kill(proc)
                break
    finally:
        # Any exception here (e.g. KeyboardInterrupt) must not leave an orphan child running.
        if proc.poll() is None:
            _kill(proc)
        os.close(watchdog_write)
    wall = time.monotonic() - started
    common: dict[str, Any] = {"wall_s": wall, "pid": proc.pid, "returncode": proc.returncode, "affinity": pin}

    if killed_for == FAILURE_RUN_TIMEOUT:
        return TimingOutcome(
            ok=False, failure_class=FAILURE_RUN_TIMEOUT,
            error=f"run timeout fired: the measurement ran past its {limit:g} s limit and was killed", **common,
        )
    if killed_for == FAILURE_CANCELLED:
        return TimingOutcome(ok=False, failure_class=FAILURE_CANCELLED, error="cancelled by the server", **common)

    report = _parse_report(stdout)
    if report is None:
        tail = stderr.decode("utf-8", "replace")[-_STDERR_TAIL:].strip()
        return TimingOutcome(
            ok=False,
            failure_class=FAILURE_RUNTIME,
            error=f"measurement process {_exit_description(proc.returncode)} without a report"
            + (f": {tail}" if tail else ""),
            **common,
        )
    common["affinity"] = report.affinity
    fields = report.model_dump(exclude={"ok", "failure_class", "error", "affinity"})
    if not report.ok:
        return TimingOutcome(
            ok=False, failure_class=report.failure_class or FAILURE_RUNTIME, error=report.error or "unknown error",
            **fields, **common,
        )
    try:
        stats = compute_stats(report.samples_ms)
    except ValueError as exc:
        return TimingOutcome(ok=False, failure_class=FAILURE_RUNTIME, error=f"bad samples: {exc}", **fields, **common)
    return TimingOutcome(ok=True, stats=stats, **fields, **common)


def _parse_report(stdout: bytes) -> ChildReport | None:
    for line in reversed(stdout.decode("utf-8", "replace").strip().splitlines()):
        try:
            return ChildReport.model_validate_json(line)
        except ValueError:
            continue
    return None


# ------------------------------------------------------------------------------ timing protocol


def classify_failure(exc: BaseException, default: str) -> str:
    """`runtime_unavailable`, `out_of_memory` or `unsupported_op` when the exception says so,
    else `default`: the class of the stage that failed (runtime_unavailable while importing the
    runtime, load_error while building the session, runtime_error after)."""
    if isinstance(exc, RuntimeUnavailable):
        return FAILURE_RUNTIME_UNAVAILABLE
    text = f"{type(exc).__name__}: {exc}".lower()
    if isinstance(exc, MemoryError) or any(marker in text for marker in _OUT_OF_MEMORY_MARKERS):
        return FAILURE_OUT_OF_MEMORY
    if isinstance(exc, NotImplementedError) or any(marker in text for marker in _UNSUPPORTED_MARKERS):
        return FAILURE_UNSUPPORTED_OP
    return default


def clocked(run: Callable[[], object]) -> Callable[[], int]:
    """`run` wrapped to return how long it took, in nanoseconds (at least 1)."""
    clock = time.perf_counter_ns

    def run_ns() -> int:
        t0 = clock()
        run()
        return max(clock() - t0, 1)

    return run_ns


def warm_up(run_ns: Callable[[], int], protocol: TimingProtocol) -> int:
    """Warm up in windows of `warmup_window` runs; returns the number of runs done.

    Stops once at least `warmup_runs` runs are done and the median of a window is within
    `warmup_tolerance` (relative) of the previous window's median, or when `warmup_max_runs`
    runs are done (but never before `warmup_runs`).
    """
    cap = max(protocol.warmup_runs, protocol.warmup_max_runs)
    done = 0
    previous: float | None = None
    while done < cap:
        window = [run_ns() for _ in range(min(protocol.warmup_window, cap - done))]
        done += len(window)
        current = statistics.median(window)
        if done >= protocol.warmup_runs and previous is not None:
            if abs(current - previous) <= protocol.warmup_tolerance * previous:
                break
        previous = current
    return done


def timed_runs(run_ns: Callable[[], int], protocol: TimingProtocol) -> list[int]:
    """Durations (ns) of at least `min_runs` runs and `min_seconds` seconds, at most `max_runs`."""
    clock = time.perf_counter_ns
    min_ns = int(protocol.min_seconds * 1e9)
    samples: list[int] = []
    started = clock()
    while len(samples) < protocol.max_runs:
        samples.append(run_ns())
        if len(samples) >= protocol.min_runs and clock() - started >= min_ns:
            break
    return samples


# --------------------------------------------------------------------------------------- child


def _pin(cpus: list[int] | None) -> list[int] | None:
    """Pin this process to `cpus` (before the runtime starts threads: they inherit it); the CPUs
    it may run on afterwards, or None where the OS has no affinity API."""
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as exc:
            print(f"could not pin to CPUs {cpus}: {exc}", file=sys.stderr)
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def _time_model(req: TimingRequest) -> ChildReport:
    info: dict[str, Any] = {"affinity": _pin(req.cpus)}
    stage = FAILURE_RUNTIME_UNAVAILABLE  # the class of a failure in the current stage
    try:
        backend = load_backend(req.runtime, LoadSettings(
            model_path=req.model_path, threads=req.threads, provider=req.provider,
            engine_cache_dir=req.engine_cache_dir))
        info.update(runtime_version=backend.version, execution=backend.execution)

        stage = FAILURE_LOAD
        t0 = time.perf_counter_ns()
        backend.load()
        load_ms = (time.perf_counter_ns() - t0) / 1e6
        # an engine build is reported apart from the load, which is then what a cached engine costs
        info.update(load_ms=load_ms - (backend.build_ms or 0.0), engine_build_ms=backend.build_ms,
                    providers=backend.providers, execution=backend.execution)

        stage = FAILURE_RUNTIME
        run_ns = clocked(backend.prepare(req.seed))
        info["inputs"] = backend.inputs
        with backend.running():
            info["first_inference_ms"] = run_ns() / 1e6
            info["warmup_runs"] = warm_up(run_ns, req.protocol)
            samples_ns = timed_runs(run_ns, req.protocol)
    except Exception as exc:  # noqa: BLE001 - reported to the parent with its class
        return ChildReport(
            ok=False, failure_class=classify_failure(exc, stage), error=f"{type(exc).__name__}: {exc}", **info
        )
    return ChildReport(ok=True, samples_ms=[ns / 1e6 for ns in samples_ns], **info)


def _die_with_parent() -> None:
    """Exit when the agent that started this process dies, however it dies."""
    parent = int(os.environ.get(_PARENT_ENV, "0"))
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            print(f"prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}", file=sys.stderr)
    if parent and os.getppid() != parent:  # it died before the death signal was asked for
        os._exit(1)
    watchdog_fd = os.environ.get(_WATCHDOG_ENV)
    if watchdog_fd is not None:
        threading.Thread(target=_exit_on_eof, args=(int(watchdog_fd),), name="parent-watchdog", daemon=True).start()


def _exit_on_eof(fd: int) -> None:
    # Only the parent holds the write end and never writes: read returns once the parent is gone.
    while os.read(fd, 1):
        pass
    os._exit(1)


def _child_main() -> int:
    _die_with_parent()
    # Keep the real stdout for the report; anything else written to fd 1 goes to stderr.
    report_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        req = TimingRequest.model_validate_json(sys.stdin.buffer.read())
        report = _time_model(req)
    except Exception as exc:  # noqa: BLE001 - always try to report
        report = ChildReport(ok=False, failure_class=FAILURE_RUNTIME, error=f"{type(exc).__name__}: {exc}")
    with os.fdopen(report_fd, "w", encoding="utf-8") as out:
        out.write(report.model_dump_json() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
