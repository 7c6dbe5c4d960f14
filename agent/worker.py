"""The agent's main loop: register, lease a job, fetch its artifact, time it, post the result.

Registration presents the agent token stored by the last run, if any, before the registration
token; results go through the outbox in the state directory (`agent.state`), which is re-sent
before every poll until the server has acknowledged each result. Waits between retries are
randomised (`agent.backoff`) so that many agents do not hit the server in step.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from agent import __version__
from agent.backoff import full_jitter, jittered
from agent.cache import ArtifactCache, ArtifactError
from agent.capabilities import default_device_name, detect_capabilities, device_attributes
from agent.client import (
    ApiError,
    AuthError,
    BadLeaseError,
    LeaseLostError,
    ServerClient,
    ServerError,
    ServerUnavailable,
)
from agent.protocol import (
    ARTIFACT_FORMATS,
    PROTOCOL_VERSION,
    Capabilities,
    DeviceSpec,
    JobLease,
    JobResult,
    RegisterRequest,
    RegisterResponse,
    ResultStatus,
)
from agent.quality import quality_flags
from agent.runtimes import install_hint
from agent.settings import AgentSettings
from agent.state import AgentState, Credentials, StateInUse
from agent.timing import FAILURE_CANCELLED, TimingOutcome, measure

log = logging.getLogger(__name__)

FAILURE_ARTIFACT = "artifact_error"
FAILURE_BAD_LEASE = "bad_lease"
#: the folder under the artifact cache where GPU runtimes keep the engines they build
ENGINE_CACHE = "engines"
#: full-jitter backoff after failed calls: up to BASE * 2**failures seconds, at most MAX
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
#: the long-poll wait asked for varies by up to this share either way
POLL_JITTER = 0.1
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
            except Exception:  # a heartbeat bug must not kill the job silently
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
    """One agent. `rng` draws the random parts of every wait (backoff, poll jitter) and `wait`
    waits that long, returning True when the agent was asked to stop meanwhile (default: wait on
    the stop event); tests inject both."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        client: ServerClient | None = None,
        cache: ArtifactCache | None = None,
        capabilities: Capabilities | None = None,
        state: AgentState | None = None,
        rng: random.Random | None = None,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.rng = rng or random.Random()
        self.client = client or ServerClient(settings.server, settings.token, rng=self.rng)
        self.cache = cache or ArtifactCache(settings.cache_dir, settings.cache_max_bytes)
        self.state = state or AgentState(settings.state_dir)
        self.capabilities = capabilities or detect_capabilities()
        self.devices = self._device_specs()
        self.registration: RegisterResponse | None = None
        self.jobs_done = 0
        self._stop = threading.Event()
        self._wait = wait or self._stop.wait
        self._signals = 0
        self._interruptible = False  # True while blocked in something a first signal may break
        self._outbox_failures = 0
        self._outbox_due = 0.0  # time.monotonic() before which the outbox is not re-sent

    # ------------------------------------------------------------------ setup

    def _device_specs(self) -> list[DeviceSpec]:
        settings = self.settings
        names = settings.devices or [
            default_device_name(settings.threads, self.capabilities.hostname, settings.runtime, settings.provider)
        ]
        attributes = device_attributes(self.capabilities, settings.threads, settings.runtime, settings.provider)
        return [DeviceSpec(name=name, attributes=dict(attributes)) for name in dict.fromkeys(names)]

    def runtime_problem(self) -> str | None:
        """Why this host cannot measure with the configured runtime and provider, or None."""
        runtime, provider = self.settings.runtime, self.settings.provider
        if runtime.value not in self.capabilities.runtimes:
            return f"runtime {runtime.value} is not installed (pip install {install_hint(runtime)})"
        if provider is not None and provider not in self.capabilities.onnxruntime_providers:
            available = ", ".join(self.capabilities.onnxruntime_providers) or "none"
            return f"execution provider {provider} is not available (available: {available})"
        return None

    def register(self) -> RegisterResponse:
        """Register, presenting the stored agent token for this server first (to come back as the
        same agent) and the registration token when there is none or it is refused; then store
        the credentials the server returned."""
        request = RegisterRequest(name=self.settings.name, devices=self.devices, capabilities=self.capabilities)
        reply: RegisterResponse | None = None
        stored = self.state.load_credentials(self.settings.server)
        if stored is not None:
            self.client.set_token(stored.agent_token)
            try:
                reply = self.client.register(request)
            except AuthError as exc:
                log.warning("stored agent token refused (%s); registering with the registration token", exc)
        if reply is None:
            self.client.set_token(self.settings.token)
            reply = self.client.register(request)
        self.state.save_credentials(
            Credentials(server=self.settings.server, agent_id=reply.agent_id, agent_token=reply.agent_token)
        )
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

    def backoff_delay(self, failures: int) -> float:
        """Full-jitter delay after `failures` failures in a row."""
        return full_jitter(failures, BACKOFF_BASE_S, BACKOFF_MAX_S, self.rng)

    def _back_off(self, what: str, exc: Exception, failures: int) -> bool:
        """Wait before trying `what` again; True when the agent was asked to stop meanwhile."""
        delay = self.backoff_delay(failures)
        log.warning("%s failed (%s); trying again in %.1f s", what, exc, delay)
        return self._wait(delay)

    def poll_wait(self, base_s: float) -> float:
        """The long-poll wait to ask for: `base_s` give or take POLL_JITTER."""
        return jittered(base_s, POLL_JITTER, self.rng)

    # -------------------------------------------------------------------- loop

    def run(self, install_signal_handlers: bool = True) -> int:
        """Run until stopped, `max_jobs` jobs done or (with `exit_when_idle`) no job came.

        Returns a process exit code: 0 on a normal stop, 1 when this host lacks the configured
        runtime, another agent holds the state directory, or registration is refused.
        """
        handlers = self._signal_handlers() if install_signal_handlers else _null_context()
        try:
            with handlers, self.state.locked():
                return self._run()
        except AgentStopped:
            return 0
        except StateInUse as exc:
            log.error("%s", exc)
            return 1
        finally:
            self.client.close()

    def _run(self) -> int:
        problem = self.runtime_problem()
        if problem is not None:
            log.error("cannot serve %s: %s", ", ".join(d.name for d in self.devices), problem)
            return 1
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
                if self._back_off("registration", exc, failures):
                    return 0
        assert self.registration is not None
        wait = self.settings.poll_wait_s if self.settings.poll_wait_s is not None else self.registration.poll_wait_s

        failures = 0
        reregistered = False
        handed: JobLease | None = None  # the next lease, handed back with the last result
        while not self._stop.is_set():
            if self.settings.max_jobs is not None and self.jobs_done >= self.settings.max_jobs:
                log.info("done: %d job(s)", self.jobs_done)
                break
            polled = time.monotonic()
            try:
                with self._interruptible_section():
                    self.flush_outbox()
                    lease, handed = handed or self.client.next_job(self.poll_wait(wait)), None
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
                    self._back_off("re-registration", reg_exc, failures)
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
                self._back_off("polling for jobs", exc, failures)
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
                handed = self.process(lease)
            except Exception:  # one bad job must not take the agent down
                log.exception("job %d: unexpected error", lease.job_id)
            self.jobs_done += 1
        if handed is not None:
            log.warning("job %d was leased with the last result but not run; its lease will expire on the server",
                        handed.job_id)
        return 0

    def _takes_another(self) -> bool:
        """Whether the agent will run a job after the one it is finishing."""
        limit = self.settings.max_jobs
        return not self._stop.is_set() and (limit is None or self.jobs_done + 1 < limit)

    # ------------------------------------------------------------------ outbox

    def flush_outbox(self) -> None:
        """Re-send the results the server has not acknowledged, oldest job first. After the server
        was unavailable, nothing is sent before a backoff delay has passed. Raises AuthError when
        the agent token is refused (the caller registers again)."""
        if time.monotonic() < self._outbox_due:
            return
        for entry in self.state.outbox_entries(self.settings.server):
            log.info("job %d: re-sending its result from the outbox", entry.job_id)
            try:
                self._deliver(entry.job_id, entry.result)
            except ServerUnavailable as exc:
                self._outbox_retry_later(exc)
                return
        self._outbox_failures = 0

    def _outbox_retry_later(self, exc: ServerUnavailable) -> None:
        self._outbox_failures += 1
        delay = self.backoff_delay(self._outbox_failures)
        self._outbox_due = time.monotonic() + delay
        log.warning("server unavailable for results (%s); kept in the outbox, re-sending in %.1f s", exc, delay)

    def _submit(self, job_id: int, result: JobResult, lease_next: bool = False) -> JobLease | None:
        """Put `result` in the outbox, then post it. Returns the next lease the server handed back
        with it (asked for with `lease_next`)."""
        self.state.outbox_put(self.settings.server, job_id, result)
        try:
            return self._deliver(job_id, result, lease_next)
        except ServerUnavailable as exc:
            self._outbox_retry_later(exc)
        except AuthError as exc:
            log.warning("job %d: agent token refused (%s); the result stays in the outbox", job_id, exc)
        return None

    def _deliver(self, job_id: int, result: JobResult, lease_next: bool = False) -> JobLease | None:
        """Post one result of the outbox and remove it once the server accepted it or refused it
        for good (409 stale lease, 403, 404, any other 4xx but 401); returns the next lease that
        came with the answer. Raises ServerUnavailable, or AuthError on 401, leaving it in the outbox."""
        delivery = None
        try:
            delivery = self.client.post_result(job_id, result, lease_next=lease_next)
        except ApiError as exc:
            if exc.status_code == 401:
                raise
            log.error("job %d: result refused: %s", job_id, exc)
        else:
            if not delivery.accepted:
                log.warning("job %d: result dropped (stale lease)", job_id)
        self.state.outbox_remove(job_id)
        if delivery is not None and delivery.bad_lease is not None:
            log.error("unusable lease handed back with job %d's result: %s", job_id, delivery.bad_lease)
            self._reject_lease(delivery.bad_lease)
        return delivery.next_lease if delivery else None

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
        self._submit(exc.job_id, result)

    def process(self, lease: JobLease) -> JobLease | None:
        """Run one leased job end to end. Returns the next lease when the server handed one back
        with the result."""
        assert self.registration is not None
        if lease.device not in {d.name for d in self.devices}:
            log.warning("job %d is for device %r, which this agent did not register", lease.job_id, lease.device)
        cancel = threading.Event()
        heartbeat = _Heartbeat(self.client, lease, self.registration.heartbeat_s, cancel)
        heartbeat.start()
        try:
            outcome = self._measure(lease, cancel)
        except AgentStopped:
            log.warning("job %d abandoned; its lease will expire on the server", lease.job_id)
            raise
        finally:
            heartbeat.stop()

        if heartbeat.lost.is_set():
            log.warning("job %d: lease lost; result dropped", lease.job_id)
            return None
        self._log_job(lease, outcome)
        return self._submit(lease.job_id, self.build_result(lease, outcome), lease_next=self._takes_another())

    def _measure(self, lease: JobLease, cancel: threading.Event) -> TimingOutcome:
        """Fetch the lease's artifact and time it; failures become a failed outcome."""
        ref = lease.artifact
        if ref.format is not ARTIFACT_FORMATS[lease.runtime]:
            return TimingOutcome(
                ok=False, failure_class=FAILURE_BAD_LEASE,
                error=f"runtime {lease.runtime.value} cannot run artifact format {ref.format.value}",
            )
        try:
            path = self.client.fetch_artifact(ref, self.cache)
        except (ArtifactError, ServerError) as exc:
            return TimingOutcome(ok=False, failure_class=FAILURE_ARTIFACT, error=f"artifact {ref.sha256}: {exc}")
        except Exception as exc:  # noqa: BLE001 - e.g. a malformed artifact URL
            return TimingOutcome(
                ok=False, failure_class=FAILURE_ARTIFACT, error=f"artifact {ref.sha256}: {type(exc).__name__}: {exc}"
            )
        if cancel.is_set():
            return TimingOutcome(ok=False, failure_class=FAILURE_CANCELLED, error="cancelled by the server")
        return measure(
            path, lease.protocol, lease.threads, runtime=lease.runtime, provider=lease.provider, cancel=cancel,
            engine_cache_dir=self.settings.cache_dir / ENGINE_CACHE,
        )

    def build_result(self, lease: JobLease, outcome: TimingOutcome) -> JobResult:
        return JobResult(
            lease_id=lease.lease_id,
            status=ResultStatus.ok if outcome.ok else ResultStatus.failed,
            stats=outcome.stats if outcome.ok else None,
            samples_ms=outcome.samples_ms if outcome.ok else [],
            load_ms=outcome.load_ms,
            first_inference_ms=outcome.first_inference_ms,
            warmup_runs=outcome.warmup_runs,
            error=None if outcome.ok else (outcome.error or "unknown error")[:10_000],
            failure_class=None if outcome.ok else outcome.failure_class,
            provenance=self.provenance(lease, outcome),
        )

    def provenance(self, lease: JobLease, outcome: TimingOutcome) -> Provenance:
        """Where and how the measurement ran: host, runtime (version, execution provider asked
        for and those used, thread and execution settings), protocol and inputs."""
        caps = self.capabilities
        proto = lease.protocol
        return {
            "agent_version": __version__,
            "protocol_version": PROTOCOL_VERSION,
            "agent_name": self.settings.name,
            "hostname": caps.hostname,
            "device": lease.device,
            "runtime": lease.runtime.value,
            "runtime_version": outcome.runtime_version or caps.runtimes.get(lease.runtime.value, ""),
            "provider": lease.provider,
            "providers": list(outcome.providers),
            "threads": lease.threads,
            **outcome.execution,
            "engine_build_ms": outcome.engine_build_ms,
            "affinity": ",".join(str(c) for c in outcome.affinity) if outcome.affinity is not None else None,
            "cpu_model": caps.cpu_model,
            "cpu_cores": caps.cpu_cores,
            "memory_bytes": caps.memory_bytes,
            "os": caps.os,
            "python": caps.python,
            "artifact_sha256": lease.artifact.sha256,
            "artifact_format": lease.artifact.format.value,
            "preset": proto.preset.value,
            "warmup_min_runs": proto.warmup_runs,
            "warmup_window": proto.warmup_window,
            "warmup_tolerance": proto.warmup_tolerance,
            "warmup_max_runs": proto.warmup_max_runs,
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
            flags = quality_flags(outcome.samples_ms, lease.protocol)
            log.info(
                "job %d device=%s sha=%s median=%.3f ms n=%d warm-up=%s flags=%s",
                lease.job_id, lease.device, sha, outcome.stats.median_ms, outcome.stats.n, outcome.warmup_runs,
                ",".join(flags) or "none",
            )
        else:
            log.info(
                "job %d device=%s sha=%s failed (%s): %s",
                lease.job_id, lease.device, sha, outcome.failure_class, (outcome.error or "")[:200],
            )


@contextmanager
def _null_context() -> Iterator[None]:
    yield
