"""Job lifecycle: submit (or reuse a measurement), heartbeat, record the result (leasing is in `leasing`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from agent.protocol import (
    INFRASTRUCTURE_FAILURES,
    PRESETS,
    PROTOCOL_VERSION,
    HeartbeatResponse,
    JobResult,
    Preset,
    ResultStatus,
)
from agent.quality import quality_flags
from server import metrics
from server.errors import Conflict, Forbidden, Invalid, NotFound
from server.models import (
    Device,
    DeviceState,
    Job,
    JobKind,
    JobStatus,
    Measurement,
    Predictor,
    as_utc,
    utcnow,
)
from server.services import health, selectors, training_queue
from server.services.wakeup import jobs_changed
from server.settings import Settings

FINISHED = (JobStatus.done, JobStatus.failed, JobStatus.cancelled)


@dataclass(frozen=True)
class Target:
    """What a job measures: an architecture (exported when leased) or an uploaded artifact."""

    architecture_id: int | None = None
    artifact_sha256: str | None = None


def submit(session: Session, settings: Settings, target: Target, *, device: Device | None = None,
           selector: str | None = None, preset: Preset = Preset.standard, priority: int = 0, force: bool = False,
           queue_deadline_s: float | None = None, run_timeout_s: float | None = None,
           onboarding_id: int | None = None) -> Job:
    """Queue a job for a device, or for any device matching `selector`.

    Unless `force`, a valid measurement of the same target on the same device with the same
    preset and protocol version is reused: the job is done at once, marked `reused`.
    """
    if (device is None) == (selector is None):
        raise ValueError("give a device or a selector")
    if selector is not None:
        check_selector(session, selector)
    now = utcnow()
    job = Job(device_id=device.id if device else None, selector=selector, architecture_id=target.architecture_id,
              artifact_sha256=target.artifact_sha256, preset=preset.value, priority=priority, force=force,
              deadline_at=now + timedelta(seconds=queue_deadline_s) if queue_deadline_s else None,
              run_timeout_s=run_timeout_s or settings.run_timeout_s, onboarding_id=onboarding_id)
    reusable = None if force or device is None else reusable_measurement(session, device, target, preset)
    if reusable is not None:
        job.status, job.reused, job.measurement_id, job.finished_at = JobStatus.done, True, reusable, now
    else:
        jobs_changed(session, job.device_id)
    session.add(job)
    session.flush()
    return job


def check_selector(session: Session, selector: str) -> None:
    """422 unless the selector parses and some device that is not retired matches it."""
    try:
        selectors.parse(selector)
    except selectors.SelectorError as exc:
        raise Invalid(str(exc), "selector") from exc
    devices = session.scalars(select(Device).where(Device.state != DeviceState.retired, Device.source != "imported"))
    if not any(selectors.matches(selector, device) for device in devices):
        raise Invalid(f"no device matches {selector!r}, so the job could never run", "selector")


def reusable_measurement(session: Session, device: Device, target: Target, preset: Preset) -> int | None:
    same_target = (Measurement.architecture_id == target.architecture_id if target.architecture_id is not None
                   else Measurement.artifact_sha256 == target.artifact_sha256)
    return session.scalar(
        select(Measurement.id)
        .where(Measurement.device_id == device.id, same_target, Measurement.valid,
               Measurement.preset == preset.value, Measurement.protocol_version == PROTOCOL_VERSION)
        .order_by(Measurement.id.desc())
        .limit(1)
    )


def queue_position(session: Session, job: Job) -> int | None:
    """How many queued jobs are ahead of this one for its device (or among selector jobs)."""
    if job.status is not JobStatus.queued:
        return None
    same_queue = Job.device_id == job.device_id if job.device_id is not None else Job.device_id.is_(None)
    ahead = or_(Job.priority > job.priority, and_(Job.priority == job.priority, Job.id < job.id))
    return session.scalar(select(func.count()).where(Job.status == JobStatus.queued, same_queue, ahead))


# ------------------------------------------------------------------------------------ agents' calls


def _leased_job(session: Session, agent_id: int, job_id: int, lease_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id).with_for_update(of=Job))
    if job is None:
        raise NotFound(f"no job {job_id}", "job_id")
    if job.lease_id != lease_id:
        raise Conflict(f"lease {lease_id} of job {job_id} is stale: it expired or the job was re-leased", "lease_id")
    if job.agent_id != agent_id:
        raise Forbidden(f"job {job_id} is not leased to this agent")
    return job


def heartbeat(session: Session, agent_id: int, job_id: int, lease_id: str, lease_ttl_s: float) -> HeartbeatResponse:
    job = _leased_job(session, agent_id, job_id, lease_id)
    if job.status != JobStatus.running:
        raise Conflict(f"job {job_id} is {job.status.value}, not running", "lease_id")
    job.lease_expires_at = utcnow() + timedelta(seconds=lease_ttl_s)
    return HeartbeatResponse(lease_expires_at=as_utc(job.lease_expires_at).isoformat(), cancel_requested=job.cancel_requested)


# ------------------------------------------------------------------------------------ results


def record_result(session: Session, agent_id: int, job_id: int, result: JobResult, settings: Settings) -> Job:
    """Store the agent's result; posting the same result twice is harmless.

    An infrastructure failure puts the job back in the queue (up to `max_attempts` tries); any
    other failure is the model's and is the job's result.
    """
    job = _leased_job(session, agent_id, job_id, result.lease_id)
    if job.status in FINISHED:
        return job
    if job.status != JobStatus.running:
        raise Conflict(f"job {job_id} is {job.status.value}, not running", "lease_id")
    if result.status is ResultStatus.failed and result.failure_class in INFRASTRUCTURE_FAILURES:
        retry(job, f"{result.failure_class}: {result.error}", settings.max_attempts, result.failure_class)
        jobs_changed(session, job.device_id)
        return job
    now = utcnow()
    job.finished_at = now
    measurement = None
    if result.status is ResultStatus.failed:
        job.status = JobStatus.cancelled if result.failure_class == "cancelled" else JobStatus.failed
        job.error, job.failure_class = result.error, result.failure_class
    else:
        measurement = job.measurement = _measurement(job, result)
        job.status = JobStatus.done
    release_device(job)
    if measurement is not None and measurement.valid and job.kind is JobKind.measure and job.onboarding_id is None:
        _readapt_later(session, job, settings)
    if job.started_at is not None:
        metrics.JOB_RUN.labels(job.kind.value, job.status.value).observe((now - as_utc(job.started_at)).total_seconds())
    health.after_job(session, job, measurement, settings)
    jobs_changed(session, job.device_id)
    return job


def _readapt_later(session: Session, job: Job, settings: Settings) -> None:
    """A new valid measurement of a device with an adapted predictor in its space: re-adapt soon."""
    if job.architecture is None or job.device_id is None:
        return
    space_id = job.architecture.space_id
    adapted = session.scalar(
        select(Predictor.id).where(Predictor.device_id == job.device_id, Predictor.space_id == space_id).limit(1)
    )
    if adapted is not None:
        training_queue.schedule_readaptation(session, space_id, job.device_id, settings.readapt_delay_s)


def retry(job: Job, reason: str, max_attempts: int, failure_class: str) -> None:
    """Back to the queue after an infrastructure failure, or failed once the tries are used up."""
    release_device(job)
    job.lease_id, job.agent_id, job.lease_expires_at = None, None, None
    if job.attempts >= max_attempts:
        job.status, job.failure_class, job.finished_at = JobStatus.failed, failure_class, utcnow()
        job.error = f"gave up after {job.attempts} attempts; last: {reason}"
    else:
        job.status, job.error = JobStatus.queued, f"attempt {job.attempts}: {reason}"
        metrics.JOB_RETRIES.labels(failure_class).inc()
        if job.selector is not None:
            job.device_id = None


def release_device(job: Job) -> None:
    device = job.device
    if device is not None and device.state is DeviceState.busy:
        device.state = DeviceState.online


def _measurement(job: Job, result: JobResult) -> Measurement:
    assert result.stats is not None
    flags = quality_flags(result.samples_ms, PRESETS[Preset(job.preset)])
    provenance = {**result.provenance, "artifact_sha256": job.artifact_sha256, "preset": job.preset,
                  "protocol_version": result.protocol_version}
    for field in ("load_ms", "first_inference_ms", "warmup_runs"):
        if getattr(result, field) is not None:
            provenance[field] = getattr(result, field)
    return Measurement(
        device_id=job.device_id, architecture_id=job.architecture_id, artifact_sha256=job.artifact_sha256,
        job_id=job.id, latency_ms=result.stats.median_ms, stats=result.stats.model_dump(),
        samples_ms=result.samples_ms, flags=flags, valid=not flags, preset=job.preset,
        protocol_version=result.protocol_version, provenance=provenance, source="measured",
    )
