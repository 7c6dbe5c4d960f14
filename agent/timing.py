"""Time one ONNX model with ONNX Runtime, in a child process.

The parent (`measure`) starts `python -m agent.timing` in its own session, writes a
`TimingRequest` as JSON to its stdin and reads one `ChildReport` as JSON from its stdout. A child
that runs past `timeout_s`, or whose job is cancelled, is killed. Running the measurement in a
fresh process keeps a crashing or hanging model from taking the agent down, lets the child be
pinned to its own CPUs, and gives every measurement the same clean process state.

In the child, stdout is redirected to stderr before onnxruntime is imported, so native log lines
cannot corrupt the report; the report goes to a duplicate of the original stdout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from agent.protocol import LatencyStats, TimingProtocol

CPU_PROVIDER = "CPUExecutionProvider"
DEFAULT_SEED = 0
_POLL_S = 0.05
_STDERR_TAIL = 4000

FAILURE_TIMEOUT = "timeout"
FAILURE_CANCELLED = "cancelled"
FAILURE_LOAD = "load_error"
FAILURE_RUNTIME = "runtime_error"


class TimingRequest(BaseModel):
    """What the parent asks the child to do."""

    model_path: str
    threads: int = Field(ge=1)
    protocol: TimingProtocol
    cpus: list[int] | None = None
    seed: int = DEFAULT_SEED


class ChildReport(BaseModel):
    """What the child reports back (timings in milliseconds)."""

    ok: bool
    failure_class: str | None = None
    error: str | None = None
    samples_ms: list[float] = Field(default_factory=list)
    load_ms: float | None = None
    first_inference_ms: float | None = None
    affinity: list[int] | None = None
    runtime_version: str | None = None
    providers: list[str] = Field(default_factory=list)
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


def _child_command() -> tuple[list[str], dict[str, str], str]:
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
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


def measure(
    model_path: str | os.PathLike[str],
    protocol: TimingProtocol,
    threads: int,
    *,
    cpus: list[int] | None | bool = True,
    cancel: threading.Event | None = None,
    seed: int = DEFAULT_SEED,
    timeout_s: float | None = None,
) -> TimingOutcome:
    """Time `model_path` in a child process; never raises for model or child failures.

    `cpus`: True pins to `choose_cpus(threads)`, a list pins to those CPUs, None/False does not
    pin. The child is killed after `timeout_s` (default `protocol.timeout_s`, counting model load)
    or as soon as `cancel` is set; the outcome then has failure_class "timeout" / "cancelled".
    """
    pin = choose_cpus(threads) if cpus is True else (list(cpus) if cpus else None)
    request = TimingRequest(
        model_path=str(Path(model_path).resolve()), threads=threads, protocol=protocol, cpus=pin, seed=seed
    )
    limit = protocol.timeout_s if timeout_s is None else timeout_s
    cmd, env, cwd = _child_command()
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
        start_new_session=True,  # a terminal Ctrl-C reaches the agent, which decides; not the child
    )
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
                killed_for = FAILURE_TIMEOUT
            if killed_for:
                _kill(proc)
                break
    finally:
        # Any exception here (e.g. KeyboardInterrupt) must not leave an orphan child running.
        if proc.poll() is None:
            _kill(proc)
    wall = time.monotonic() - started
    common: dict[str, Any] = {"wall_s": wall, "pid": proc.pid, "returncode": proc.returncode, "affinity": pin}

    if killed_for == FAILURE_TIMEOUT:
        return TimingOutcome(
            ok=False, failure_class=FAILURE_TIMEOUT, error=f"measurement exceeded {limit:g} s and was killed", **common
        )
    if killed_for == FAILURE_CANCELLED:
        return TimingOutcome(ok=False, failure_class=FAILURE_CANCELLED, error="cancelled by the server", **common)

    report = _parse_report(stdout)
    if report is None:
        tail = stderr.decode("utf-8", "replace")[-_STDERR_TAIL:].strip()
        return TimingOutcome(
            ok=False,
            failure_class=FAILURE_RUNTIME,
            error=f"measurement process exited with code {proc.returncode} without a report"
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


# --------------------------------------------------------------------------------------- child

_NUMPY_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16,
    "tensor(int32)": np.int32,
    "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def _make_inputs(session: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs of the declared shapes (symbolic/unknown dims -> 1, i.e. batch 1)."""
    feeds: dict[str, np.ndarray] = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in (arg.shape or [])]
        dtype = _NUMPY_TYPES.get(arg.type)
        if dtype is None:
            raise TypeError(f"input {arg.name!r} has unsupported type {arg.type}")
        if np.issubdtype(dtype, np.floating):
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[arg.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            feeds[arg.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def _time_model(req: TimingRequest) -> ChildReport:
    affinity: list[int] | None = None
    if req.cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, req.cpus)  # before onnxruntime starts threads: they inherit it
        except OSError as exc:
            print(f"could not pin to CPUs {req.cpus}: {exc}", file=sys.stderr)
    if hasattr(os, "sched_getaffinity"):
        affinity = sorted(os.sched_getaffinity(0))

    import onnxruntime as ort

    base: dict[str, Any] = {"affinity": affinity, "runtime_version": str(ort.__version__)}
    proto = req.protocol
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = req.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3

    t0 = time.perf_counter_ns()
    try:
        session = ort.InferenceSession(req.model_path, sess_options=opts, providers=[CPU_PROVIDER])
    except Exception as exc:  # noqa: BLE001 - any failure to build the session is a load error
        return ChildReport(ok=False, failure_class=FAILURE_LOAD, error=f"{type(exc).__name__}: {exc}", **base)
    load_ms = (time.perf_counter_ns() - t0) / 1e6
    base.update(load_ms=load_ms, providers=list(session.get_providers()))

    try:
        feeds = _make_inputs(session, np.random.default_rng(req.seed))
        base["inputs"] = {name: list(arr.shape) for name, arr in feeds.items()}
        run = session.run
        t0 = time.perf_counter_ns()
        run(None, feeds)
        base["first_inference_ms"] = (time.perf_counter_ns() - t0) / 1e6

        for _ in range(proto.warmup_runs):
            run(None, feeds)

        samples_ns: list[int] = []
        min_ns = int(proto.min_seconds * 1e9)
        start = time.perf_counter_ns()
        perf = time.perf_counter_ns
        while len(samples_ns) < proto.max_runs:
            t0 = perf()
            run(None, feeds)
            t1 = perf()
            samples_ns.append(max(t1 - t0, 1))
            if len(samples_ns) >= proto.min_runs and t1 - start >= min_ns:
                break
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a runtime error
        return ChildReport(ok=False, failure_class=FAILURE_RUNTIME, error=f"{type(exc).__name__}: {exc}", **base)
    return ChildReport(ok=True, samples_ms=[ns / 1e6 for ns in samples_ns], **base)


def _child_main() -> int:
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
