"""Job lifecycle: submit (or reuse a measurement), heartbeat, retry (leasing is in `leasing`, results in
`results`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session

from agent.protocol import ARTIFACT_FORMATS, PROTOCOL_VERSION, HeartbeatResponse, Preset, Runtime
from server import metrics
from server.background.wakeup import jobs_changed
from server.db import AnyRow
from server.errors import Conflict, Forbidden, Invalid, NotFound
from server.models import (
    Artifact,
    Device,
    DeviceState,
    Job,
    JobStatus,
    Measurement,
    Predictor,
    as_utc,
    utcnow,
)
from server.schemas import JobIn, JobOut
from server.services import selectors, training_queue
from server.services.artifacts import export_problem
from server.services.catalog import (
    canonical_key,
    ensure_architecture,
    get_device,
    resolve_space,
)
from server.settings import Settings

FINISHED = (JobStatus.done, JobStatus.failed, JobStatus.cancelled)
#: a device's state once its job ended: online again if it was busy (a degraded or paused one stays so)
FREED_STATE = case((Device.state == DeviceState.busy, DeviceState.online), else_=Device.state)
#: a job as an ORM object or as a row of its columns
LeasedJob = TypeVar("LeasedJob", Job, AnyRow)


@dataclass(frozen=True)
class Target:
    """What a job measures: an architecture (exported when leased) or an uploaded artifact."""

    architecture_id: int | None = None
    artifact_sha256: str | None = None


def describe(fields: Mapping[str, Any]) -> JobOut:
    """A job's answer, from its columns and names labelled as `JobOut` fields: the one builder,
    for jobs loaded as ORM objects (`describe_job`) and as rows of the result path alike."""
    return JobOut.model_validate(fields)


def describe_job(session: Session, job: Job) -> JobOut:
    """`describe` for a job loaded as an ORM object."""
    measurement = job.measurement
    return describe({
        **{column: getattr(job, column) for column in _JOB_COLUMNS},
        "device": job.device.name if job.device else None,
        "space": job.architecture.space.name if job.architecture else None,
        "architecture": job.architecture.key if job.architecture else None,
        "queue_position": queue_position(session, job),
        "latency_ms": measurement.latency_ms if measurement else None,
        "flags": measurement.flags if measurement else None,
        "valid": measurement.valid if measurement else None,
    })


_JOB_COLUMNS = ("id", "kind", "selector", "artifact_sha256", "preset", "priority", "status", "attempts", "error",
                "failure_class", "measurement_id", "reused", "created_at", "started_at", "finished_at")


def get_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}", "job_id")
    return job


def submit_request(session: Session, settings: Settings, body: JobIn) -> Job:
    """A user's submission: the architecture registered (canonical key) or the artifact checked."""
    if body.architecture is not None:
        assert body.space is not None
        space = resolve_space(body.space)
        target = Target(architecture_id=ensure_architecture(session, space, canonical_key(space, body.architecture)).id)
    else:
        if session.get(Artifact, body.artifact) is None:
            raise NotFound(f"no artifact {body.artifact}; upload it first (POST /api/v1/artifacts)", "artifact")
        target = Target(artifact_sha256=body.artifact)
    return submit(
        session, settings, target, device=get_device(session, body.device) if body.device else None,
        selector=body.selector, preset=body.preset, priority=body.priority, force=body.force,
        queue_deadline_s=body.queue_deadline_s, run_timeout_s=body.run_timeout_s,
    )


def cancel(job: Job) -> bool:
    """Cancel a queued job at once; a running one is told to stop at its next heartbeat. True when
    the job ended now (its onboarding may be complete)."""
    if job.status == JobStatus.queued:
        job.status, job.finished_at = JobStatus.cancelled, utcnow()
        return True
    if job.status == JobStatus.running:
        job.cancel_requested = True
        return False
    raise Conflict(f"job {job.id} is already {job.status.value}", "job_id")


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
    if device is not None and target.architecture_id is not None:
        check_exportable(device)
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


def check_exportable(device: Device) -> None:
    """422 when this server cannot export architectures in the format the device's runtime runs."""
    runtime = Runtime._value2member_map_.get(device.runtime)
    problem = export_problem(ARTIFACT_FORMATS[runtime]) if isinstance(runtime, Runtime) else None
    if problem is not None:
        raise Invalid(f"device {device.name} runs {device.runtime}: {problem}", "device")


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


def check_lease(job: LeasedJob | None, job_id: int, agent_id: int, lease_id: str) -> LeasedJob:
    """The job, if the agent holds this lease of it: 404 for no such job, 409 for a stale lease,
    403 for another agent's job."""
    if job is None:
        raise NotFound(f"no job {job_id}", "job_id")
    if job.lease_id != lease_id:
        raise Conflict(f"lease {lease_id} of job {job_id} is stale: it expired or the job was re-leased", "lease_id")
    if job.agent_id != agent_id:
        raise Forbidden(f"job {job_id} is not leased to this agent")
    return job


def heartbeat(session: Session, agent_id: int, job_id: int, lease_id: str, lease_ttl_s: float) -> HeartbeatResponse:
    job = check_lease(session.scalar(select(Job).where(Job.id == job_id).with_for_update(of=Job)),
                      job_id, agent_id, lease_id)
    if job.status != JobStatus.running:
        raise Conflict(f"job {job_id} is {job.status.value}, not running", "lease_id")
    job.lease_expires_at = utcnow() + timedelta(seconds=lease_ttl_s)
    return HeartbeatResponse(lease_expires_at=as_utc(job.lease_expires_at).isoformat(),
                             cancel_requested=job.cancel_requested)


# ------------------------------------------------------------------------------------ results (see `results`)


def readapt_later(session: Session, space_id: int, device_id: int, settings: Settings) -> None:
    """A new valid measurement of a device with an adapted predictor in the space: re-adapt soon."""
    adapted = session.scalar(
        select(Predictor.id).where(Predictor.device_id == device_id, Predictor.space_id == space_id).limit(1)
    )
    if adapted is not None:
        training_queue.schedule_readaptation(session, space_id, device_id, settings.readapt_delay_s)


def retry(job: Job, reason: str, max_attempts: int, failure_class: str) -> None:
    """Back to the queue after an infrastructure failure, or failed once the tries are used up."""
    _unlease(job)
    if job.attempts >= max_attempts:
        job.status, job.failure_class, job.finished_at = JobStatus.failed, failure_class, utcnow()
        job.error = f"gave up after {job.attempts} attempts; last: {reason}"
    else:
        job.status, job.error = JobStatus.queued, f"attempt {job.attempts}: {reason}"
        metrics.JOB_RETRIES.labels(failure_class).inc()
        if job.selector is not None:
            job.device_id = None


def hand_back(session: Session, job: Job) -> None:
    """Back to the queue with its attempt uncounted: its agent was taken away, the job did not fail
    (the ORM form of the lease's own hand-back in leasing)."""
    _unlease(job)
    job.status, job.started_at, job.attempts = JobStatus.queued, None, max(0, job.attempts - 1)
    if job.selector is not None:
        job.device_id = None
    jobs_changed(session, job.device_id)


def _unlease(job: Job) -> None:
    release_device(job)
    job.lease_id, job.agent_id, job.lease_expires_at = None, None, None


def release_device(job: Job) -> None:
    """`FREED_STATE` for a job loaded as an ORM object."""
    device = job.device
    if device is not None and device.state is DeviceState.busy:
        device.state = DeviceState.online
