"""Job lifecycle: submit (or reuse a measurement), lease to an agent, heartbeat, record the result."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Row, and_, case, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from agent.protocol import (
    INFRASTRUCTURE_FAILURES,
    PRESETS,
    PROTOCOL_VERSION,
    ArtifactFormat,
    ArtifactRef,
    HeartbeatResponse,
    JobLease,
    JobResult,
    Preset,
    ResultStatus,
    Runtime,
)
from agent.quality import quality_flags
from server import metrics
from server.errors import Conflict, Forbidden, Invalid, NotFound
from server.models import (
    Agent,
    Architecture,
    AgentDevice,
    Artifact,
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
from server.services.artifacts import ArtifactStore, materialise
from server.services.wakeup import jobs_changed
from server.settings import Settings

FINISHED = (JobStatus.done, JobStatus.failed, JobStatus.cancelled)
#: how many queued selector jobs one claim looks through for one its devices match
SELECTOR_SCAN = 50
#: another job of the same device (built once: aliasing a mapped class is costly)
_RUNNING = aliased(Job)
#: queued jobs for any device matching a selector, most urgent first
_SELECTOR_JOBS = (
    select(Job.id, Job.priority, Job.selector)
    .where(Job.status == JobStatus.queued, Job.device_id.is_(None))
    .order_by(Job.priority.desc(), Job.id)
    .limit(SELECTOR_SCAN)
    .with_for_update(of=Job, skip_locked=True)
)
#: an agent's `last_seen` is written at most this often (offline detection works in minutes)
LAST_SEEN_RESOLUTION_S = 5


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


# ------------------------------------------------------------------------------------ leasing


def claim_next(session: Session, agent_id: int, store: ArtifactStore, settings: Settings) -> JobLease | None:
    """Lease the most urgent queued job one of the agent's idle devices may run.

    Atomic on both backends: the job row is locked (`FOR UPDATE SKIP LOCKED` on Postgres) and
    flipped from queued with a guarded UPDATE, and a partial unique index allows one running job
    per device; losing either race means no lease this time, never a double one. This is the
    farm's hottest path, so it is a handful of Core statements rather than ORM loads.
    """
    _touch_agent(session, agent_id, utcnow())
    choice = _named_candidate(session, agent_id)
    selector_jobs = session.execute(_SELECTOR_JOBS).all()
    if selector_jobs:
        matching = _selector_candidate(session, agent_id, selector_jobs)
        if matching is not None and (choice is None or (matching[1], -matching[0]) > (choice[1], -choice[0])):
            choice = matching
    if choice is None:
        return None
    job_id, _, device_id = choice
    # read after the candidate query saw the device idle, so after the previous job's finish time
    now = utcnow()
    lease_id = str(uuid.uuid4())
    expires = now + timedelta(seconds=settings.lease_ttl_s)
    try:
        flipped = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.queued)
            .values(status=JobStatus.running, device_id=device_id, agent_id=agent_id, lease_id=lease_id,
                    lease_expires_at=expires, started_at=now, attempts=Job.attempts + 1, cancel_requested=False)
            .returning(Job.artifact_sha256, Job.architecture_id, Job.preset, Job.run_timeout_s, Job.kind,
                       Job.created_at)
        ).first()
    except IntegrityError:  # another agent of the same device won it a moment ago
        session.rollback()
        return None
    if flipped is None:
        return None
    metrics.JOB_WAIT.labels(flipped.kind.value).observe((now - as_utc(flipped.created_at)).total_seconds())
    device = session.execute(
        update(Device)
        .where(Device.id == device_id)
        .values(last_seen=now, state=case((Device.state.in_([DeviceState.online, DeviceState.offline]),
                                           DeviceState.busy), else_=Device.state))
        .returning(Device.name, Device.threads, Device.runtime, Device.attributes)
    ).one()
    runtime = Runtime(device.runtime) if device.runtime in Runtime._value2member_map_ else Runtime.onnxruntime
    artifact = _leased_artifact(session, store, job_id, flipped.artifact_sha256, flipped.architecture_id, runtime)
    timeout_s = flipped.run_timeout_s or settings.run_timeout_s
    provider = device.attributes.get("provider")
    return JobLease(
        job_id=job_id,
        lease_id=lease_id,
        lease_expires_at=expires.isoformat(),
        device=device.name,
        threads=device.threads or 1,
        runtime=runtime,
        provider=str(provider) if provider else None,
        artifact=ArtifactRef(sha256=artifact.sha256, format=ArtifactFormat(artifact.format),
                             size_bytes=artifact.size_bytes, url=f"/api/v1/artifacts/{artifact.sha256}"),
        protocol=PRESETS[Preset(flipped.preset)].model_copy(update={"timeout_s": timeout_s}),
    )


def _touch_agent(session: Session, agent_id: int, now: datetime) -> None:
    """Record that the agent is alive; a write (and a WAL flush) at most every few seconds."""
    session.execute(
        update(Agent)
        .where(Agent.id == agent_id,
               or_(Agent.last_seen.is_(None), Agent.last_seen < now - timedelta(seconds=LAST_SEEN_RESOLUTION_S)))
        .values(last_seen=now)
    )


def _idle_devices(agent_id: int) -> ColumnElement[bool]:
    """Devices the agent serves that may take a job now (degraded ones take canaries only)."""
    return and_(
        AgentDevice.agent_id == agent_id,
        Device.state.not_in([DeviceState.paused, DeviceState.retired]),
        ~exists().where(_RUNNING.device_id == Device.id, _RUNNING.status == JobStatus.running),
    )


def _named_candidate(session: Session, agent_id: int) -> tuple[int, int, int] | None:
    """(job id, priority, device id) of the most urgent queued job named for an idle device."""
    row = session.execute(
        select(Job.id, Job.priority, Job.device_id)
        .join(Device, Device.id == Job.device_id)
        .join(AgentDevice, AgentDevice.device_id == Device.id)
        .where(Job.status == JobStatus.queued, _idle_devices(agent_id),
               or_(Device.state != DeviceState.degraded, Job.kind == JobKind.canary))
        .order_by(Job.priority.desc(), Job.id)
        .limit(1)
        .with_for_update(of=Job, skip_locked=True)
    ).first()
    return (row.id, row.priority, row.device_id) if row else None


def _leased_artifact(session: Session, store: ArtifactStore, job_id: int, sha256: str | None,
                     architecture_id: int | None, runtime: Runtime) -> Artifact:
    """The leased job's artifact; an architecture is exported in the runtime's format on first use."""
    if sha256 is not None:
        return session.get_one(Artifact, sha256)
    architecture = session.get_one(Architecture, architecture_id)
    fmt = ArtifactFormat.torch_export if runtime is Runtime.pytorch else ArtifactFormat.onnx
    artifact = materialise(session, store, architecture, fmt)
    session.execute(update(Job).where(Job.id == job_id).values(artifact_sha256=artifact.sha256))
    return artifact


def _selector_candidate(session: Session, agent_id: int,
                        jobs: Sequence[Row[tuple[int, int, str]]]) -> tuple[int, int, int] | None:
    """(job id, priority, device id) of the first of the queued selector `jobs` that one of the
    agent's idle, healthy devices matches."""
    devices = session.scalars(
        select(Device).join(AgentDevice, AgentDevice.device_id == Device.id)
        .where(_idle_devices(agent_id), Device.state != DeviceState.degraded)
    ).all()
    for job_id, priority, selector in jobs:
        for device in devices:
            if selectors.matches(selector, device):
                return job_id, priority, device.id
    return None


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
    now = utcnow()
    job.lease_expires_at = now + timedelta(seconds=lease_ttl_s)
    _touch_agent(session, agent_id, now)
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
        measurement = _store_measurement(session, job, result)
        job.status, job.measurement_id = JobStatus.done, measurement.id
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


def _store_measurement(session: Session, job: Job, result: JobResult) -> Measurement:
    assert result.stats is not None
    flags = quality_flags(result.samples_ms, PRESETS[Preset(job.preset)])
    provenance = {**result.provenance, "artifact_sha256": job.artifact_sha256, "preset": job.preset,
                  "protocol_version": result.protocol_version}
    for field in ("load_ms", "first_inference_ms", "warmup_runs"):
        if getattr(result, field) is not None:
            provenance[field] = getattr(result, field)
    measurement = Measurement(
        device_id=job.device_id, architecture_id=job.architecture_id, artifact_sha256=job.artifact_sha256,
        job_id=job.id, latency_ms=result.stats.median_ms, stats=result.stats.model_dump(),
        samples_ms=result.samples_ms, flags=flags, valid=not flags, preset=job.preset,
        protocol_version=result.protocol_version, provenance=provenance, source="measured",
    )
    session.add(measurement)
    session.flush()
    return measurement
