"""The agent's main loop: register, lease a job, fetch its artifact, time it, post the result."""

from __future__ import annotations

import logging
import signal
import threading
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager

from agent import __version__
from agent.cache import ArtifactCache, ArtifactError
from agent.capabilities import CPU_PROVIDER, default_device_name, detect_capabilities, device_attributes
from agent.client import ApiError, AuthError, BadLeaseError, LeaseLostError, ServerClient, ServerError, ServerUnavailable
from agent.protocol import (
    PROTOCOL_VERSION,
    Capabilities,
    DeviceSpec,
    JobLease,
    JobResult,
    RegisterRequest,
    RegisterResponse,
    ResultStatus,
)
from agent.settings import AgentSettings
from agent.timing import FAILURE_CANCELLED, TimingOutcome, measure

log = logging.getLogger(__name__)

FAILURE_ARTIFACT = "artifact_error"
FAILURE_BAD_LEASE = "bad_lease"
_IDLE_BACKOFF_MAX_S = 60.0
_MIN_POLL_INTERVAL_S = 1.0

Provenance = dict[str, str | int | float | bool | None | list[str]]


class AgentStopped(BaseException):
    """Raised out of a blocking call when a signal asks the agent to stop now. A BaseException,
    like KeyboardInterrupt, so that `except Exception` in job handling does not swallow it."""


class _Heartbeat(threading.Thread):
    """Heartbeats one lease every `interval_s` until stopped; sets `cancel` when the server asks
    for it or the lease is lost (then `lost` is set too)."""

    def __init__(self, client: ServerClient, lease: JobLease, interval_s: float, cancel: threading.Event) -> None:
        super().__init__(name=f"heartbeat-{lease.job_id}", daemon=True)
        self.client = client
        self.lease = lease
        self.interval_s = max(0.05, interval_s)
        self.cancel = cancel
        self.lost = threading.Event()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            try:
                reply = self.client.heartbeat(self.lease.job_id, self.lease.lease_id)
            except LeaseLostError as exc:
                log.warning("job %d: lease lost (%s); abandoning it", self.lease.job_id, exc.detail)
                self.lost.set()
                self.cancel.set()
                return
            except ServerError as exc:
                log.warning("job %d: heartbeat failed: %s", self.lease.job_id, exc)
                continue
            except Exception:  # noqa: BLE001 - a heartbeat bug must not kill the job silently
                log.exception("job %d: heartbeat error", self.lease.job_id)
                continue
            if reply.cancel_requested:
                log.info("job %d: cancel requested by the server", self.lease.job_id)
                self.cancel.set()
                return

    def stop(self) -> None:
        self._done.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout=5)


class Worker:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        client: ServerClient | None = None,
        cache: ArtifactCache | None = None,
        capabilities: Capabilities | None = None,
    ) -> None:
        self.settings = settings
        self.client = client or ServerClient(settings.server, settings.token)
        self.cache = cache or ArtifactCache(settings.cache_dir)
        self.capabilities = capabilities or detect_capabilities()
        self.devices = self._device_specs()
        self.registration: RegisterResponse | None = None
        self.jobs_done = 0
        self._stop = threading.Event()
        self._signals = 0
        self._interruptible = False  # True while blocked in something a first signal may break

    # ------------------------------------------------------------------ setup

    def _device_specs(self) -> list[DeviceSpec]:
        names = self.settings.devices or [default_device_name(self.settings.threads, self.capabilities.hostname)]
        attributes = device_attributes(self.capabilities, self.settings.threads, CPU_PROVIDER)
        return [DeviceSpec(name=name, attributes=dict(attributes)) for name in dict.fromkeys(names)]

    def register(self) -> RegisterResponse:
        # The registration token is sent again on a re-registration after an agent-token 401.
        self.client.set_token(self.settings.token)
        request = RegisterRequest(name=self.settings.name, devices=self.devices, capabilities=self.capabilities)
        reply = self.client.register(request)
        self.registration = reply
        log.info(
            "registered as agent %d (%s) for %s", reply.agent_id, self.settings.name,
            ", ".join(d.name for d in self.devices),
        )
        return reply

    # ----------------------------------------------------------------- control

    def request_stop(self) -> None:
        """Stop after the current job (or now, if idle)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        self._stop.set()
        if self._signals == 1 and not self._interruptible:
            log.info("%s: finishing the current job, then exiting (again to abort it)", name)
            return
        log.info("%s: stopping now", name)
        raise AgentStopped(name)

    @contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextmanager
    def _interruptible_section(self) -> Iterator[None]:
        self._interruptible = True
        try:
            if self._stop.is_set():
                raise AgentStopped("stop requested")
            yield
        finally:
            self._interruptible = False

    # -------------------------------------------------------------------- loop

    def run(self, install_signal_handlers: bool = True) -> int:
        """Run until stopped, `max_jobs` jobs done or (with `exit_when_idle`) no job came.

        Returns a process exit code: 0 on a normal stop, 1 when registration is refused.
        """
        handlers = self._signal_handlers() if install_signal_handlers else _null_context()
        try:
            with handlers:
                return self._run()
        except AgentStopped:
            return 0
        finally:
            self.client.close()

    def _run(self) -> int:
        failures = 0
        while True:
            try:
                with self._interruptible_section():
                    self.register()
                break
            except ApiError as exc:  # includes AuthError: a wrong token will not fix itself
                log.error("registration refused: %s", exc)
                return 1
            except ServerUnavailable as exc:
                failures += 1
                delay = min(_IDLE_BACKOFF_MAX_S, 2.0**failures)
                log.warning("server unavailable (%s); trying again in %.0f s", exc, delay)
                if self._stop.wait(delay):
                    return 0
        assert self.registration is not None
        wait = self.settings.poll_wait_s if self.settings.poll_wait_s is not None else self.registration.poll_wait_s

        failures = 0
        reregistered = False
        while not self._stop.is_set():
            if self.settings.max_jobs is not None and self.jobs_done >= self.settings.max_jobs:
                log.info("done: %d job(s)", self.jobs_done)
                break
            polled = time.monotonic()
            try:
                with self._interruptible_section():
                    lease = self.client.next_job(wait)
            except AuthError as exc:
                if reregistered:
                    log.error("agent token refused again after re-registering: %s", exc)
                    return 1
                log.warning("agent token refused (%s); registering again", exc)
                reregistered = True
                try:
                    with self._interruptible_section():
                        self.register()
                except ServerUnavailable as reg_exc:
                    reregistered = False  # not refused, just unreachable: try the whole cycle again
                    failures += 1
                    delay = min(_IDLE_BACKOFF_MAX_S, 2.0**failures)
                    log.warning("re-registration failed (%s); trying again in %.0f s", reg_exc, delay)
                    self._stop.wait(delay)
                except ServerError as reg_exc:
                    log.error("re-registration refused: %s", reg_exc)
                    return 1
                continue
            except BadLeaseError as exc:
                log.error("unusable lease from the server: %s", exc)
                self._reject_lease(exc)
                self.jobs_done += 1
                continue
            except ServerError as exc:
                failures += 1
                delay = min(_IDLE_BACKOFF_MAX_S, 2.0**failures)
                log.warning("polling for jobs failed (%s); trying again in %.0f s", exc, delay)
                self._stop.wait(delay)
                continue
            failures = 0
            reregistered = False
            if lease is None:
                if self.settings.exit_when_idle:
                    log.info("no job available; exiting (%d job(s) done)", self.jobs_done)
                    break
                # A server that answers 204 early must not turn the long poll into a busy loop.
                pause = _MIN_POLL_INTERVAL_S - (time.monotonic() - polled)
                if pause > 0:
                    self._stop.wait(pause)
                continue
            try:
                self.process(lease)
            except Exception:  # noqa: BLE001 - one bad job must not take the agent down
                log.exception("job %d: unexpected error", lease.job_id)
            self.jobs_done += 1
        return 0

    # --------------------------------------------------------------------- job

    def _reject_lease(self, exc: BadLeaseError) -> None:
        """Report a lease the agent could not parse as failed, so it does not come back forever."""
        if exc.job_id is None or exc.lease_id is None:
            return
        result = JobResult(
            lease_id=exc.lease_id,
            status=ResultStatus.failed,
            error=str(exc.detail)[:10_000],
            failure_class=FAILURE_BAD_LEASE,
            provenance={"agent_version": __version__, "protocol_version": PROTOCOL_VERSION,
                        "agent_name": self.settings.name, "hostname": self.capabilities.hostname},
        )
        try:
            self.client.post_result(exc.job_id, result)
        except ServerError as post_exc:
            log.error("job %d: reporting the bad lease failed: %s", exc.job_id, post_exc)

    def process(self, lease: JobLease) -> bool:
        """Run one leased job end to end. Returns True when the server accepted a result."""
        assert self.registration is not None
        sha = lease.artifact.sha256
        if lease.device not in {d.name for d in self.devices}:
            log.warning("job %d is for device %r, which this agent did not register", lease.job_id, lease.device)
        cancel = threading.Event()
        heartbeat = _Heartbeat(self.client, lease, self.registration.heartbeat_s, cancel)
        heartbeat.start()
        try:
            try:
                path = self.client.fetch_artifact(lease.artifact, self.cache)
            except (ArtifactError, ServerError) as exc:
                outcome = TimingOutcome(ok=False, failure_class=FAILURE_ARTIFACT, error=f"artifact {sha}: {exc}")
            except Exception as exc:  # noqa: BLE001 - e.g. a malformed artifact URL
                outcome = TimingOutcome(
                    ok=False, failure_class=FAILURE_ARTIFACT, error=f"artifact {sha}: {type(exc).__name__}: {exc}"
                )
            else:
                if cancel.is_set():
                    outcome = TimingOutcome(ok=False, failure_class=FAILURE_CANCELLED, error="cancelled by the server")
                else:
                    outcome = measure(path, lease.protocol, lease.threads, cancel=cancel)
        except AgentStopped:
            log.warning("job %d abandoned; its lease will expire on the server", lease.job_id)
            raise
        finally:
            heartbeat.stop()

        if heartbeat.lost.is_set():
            log.warning("job %d: lease lost; result dropped", lease.job_id)
            return False
        result = self.build_result(lease, outcome)
        self._log_job(lease, outcome)
        try:
            accepted = self.client.post_result(lease.job_id, result)
        except ServerError as exc:
            log.error("job %d: posting the result failed: %s", lease.job_id, exc)
            return False
        if not accepted:
            log.warning("job %d: result dropped (stale lease)", lease.job_id)
        return accepted

    def build_result(self, lease: JobLease, outcome: TimingOutcome) -> JobResult:
        return JobResult(
            lease_id=lease.lease_id,
            status=ResultStatus.ok if outcome.ok else ResultStatus.failed,
            stats=outcome.stats if outcome.ok else None,
            samples_ms=outcome.samples_ms if outcome.ok else [],
            load_ms=outcome.load_ms,
            first_inference_ms=outcome.first_inference_ms,
            error=None if outcome.ok else (outcome.error or "unknown error")[:10_000],
            failure_class=None if outcome.ok else outcome.failure_class,
            provenance=self.provenance(lease, outcome),
        )

    def provenance(self, lease: JobLease, outcome: TimingOutcome) -> Provenance:
        caps = self.capabilities
        proto = lease.protocol
        return {
            "agent_version": __version__,
            "protocol_version": PROTOCOL_VERSION,
            "agent_name": self.settings.name,
            "hostname": caps.hostname,
            "device": lease.device,
            "runtime": "onnxruntime",
            "runtime_version": outcome.runtime_version or caps.runtimes.get("onnxruntime", ""),
            "providers": list(outcome.providers) or [CPU_PROVIDER],
            "threads": lease.threads,
            "inter_op_threads": 1,
            "execution_mode": "sequential",
            "graph_optimization": "all",
            "affinity": ",".join(str(c) for c in outcome.affinity) if outcome.affinity is not None else None,
            "cpu_model": caps.cpu_model,
            "cpu_cores": caps.cpu_cores,
            "memory_bytes": caps.memory_bytes,
            "os": caps.os,
            "python": caps.python,
            "artifact_sha256": lease.artifact.sha256,
            "preset": proto.preset.value,
            "warmup_runs": proto.warmup_runs,
            "min_runs": proto.min_runs,
            "min_seconds": proto.min_seconds,
            "max_runs": proto.max_runs,
            "timeout_s": proto.timeout_s,
            "inputs": [f"{name}:{'x'.join(map(str, shape))}" for name, shape in outcome.inputs.items()],
            "wall_s": round(outcome.wall_s, 3),
        }

    def _log_job(self, lease: JobLease, outcome: TimingOutcome) -> None:
        sha = lease.artifact.sha256[:12]
        if outcome.ok and outcome.stats is not None:
            log.info(
                "job %d device=%s sha=%s median=%.3f ms n=%d",
                lease.job_id, lease.device, sha, outcome.stats.median_ms, outcome.stats.n,
            )
        else:
            log.info(
                "job %d device=%s sha=%s failed (%s): %s",
                lease.job_id, lease.device, sha, outcome.failure_class, (outcome.error or "")[:200],
            )


@contextmanager
def _null_context() -> Iterator[None]:
    yield
