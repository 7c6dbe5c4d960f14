"""Job lifecycle: submit, lease to an agent, heartbeat, record the result."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import and_, exists, select, update
from sqlalchemy.orm import Session, aliased

from agent.protocol import (
    PRESETS,
    ArtifactRef,
    HeartbeatResponse,
    JobLease,
    JobResult,
    Preset,
    ResultStatus,
)
from server.errors import Conflict, Forbidden, NotFound
from server.models import Agent, Artifact, Device, DeviceState, Job, JobStatus, Measurement, utcnow
from server.services.artifacts import ArtifactStore, materialise

MAX_ATTEMPTS = 3
UNSTABLE_IQR_RATIO = 0.10


def requeue_expired(session: Session) -> int:
    """Put jobs whose lease ran out back in the queue (or fail them after MAX_ATTEMPTS)."""
    now = utcnow()
    expired = session.scalars(
        select(Job)
        .where(Job.status == JobStatus.running, Job.lease_expires_at < now)
        .with_for_update(of=Job, skip_locked=True)
    ).all()
    for job in expired:
        if job.attempts >= MAX_ATTEMPTS:
            job.status, job.failure_class, job.finished_at = JobStatus.failed, "lease_expired", now
            job.error = f"lease expired {job.attempts} times; giving up"
        else:
            job.status, job.lease_id, job.agent_id, job.lease_expires_at = JobStatus.queued, None, None, None
    return len(expired)


def claim_next(session: Session, agent: Agent, store: ArtifactStore, lease_ttl_s: float) -> JobLease | None:
    """Lease the most urgent queued job of one of the agent's devices that is not already busy."""
    requeue_expired(session)
    running = aliased(Job)
    candidate = (
        select(Job.id)
        .join(Device, Device.id == Job.device_id)
        .where(
            Job.status == JobStatus.queued,
            Device.agent_id == agent.id,
            Device.state.not_in([DeviceState.paused, DeviceState.retired]),
            ~exists().where(and_(running.device_id == Job.device_id, running.status == JobStatus.running)),
        )
        .order_by(Job.priority.desc(), Job.id)
        .limit(1)
        .with_for_update(of=Job, skip_locked=True)
    )
    job_id = session.scalar(candidate)
    if job_id is None:
        return None
    lease_id = str(uuid.uuid4())
    now = utcnow()
    expires = now + timedelta(seconds=lease_ttl_s)
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(status=JobStatus.running, agent_id=agent.id, lease_id=lease_id, lease_expires_at=expires,
                started_at=now, attempts=Job.attempts + 1)
    ).rowcount
    if claimed != 1:
        return None
    job = session.get_one(Job, job_id)
    session.refresh(job)
    if job.artifact_sha256 is None:
        assert job.architecture is not None
        job.artifact_sha256 = materialise(session, store, job.architecture).sha256
    artifact = session.get_one(Artifact, job.artifact_sha256)
    job.device.state = DeviceState.busy
    return JobLease(
        job_id=job.id,
        lease_id=lease_id,
        lease_expires_at=expires.isoformat(),
        device=job.device.name,
        threads=job.device.threads or 1,
        artifact=ArtifactRef(sha256=artifact.sha256, format=artifact.format, size_bytes=artifact.size_bytes,
                             url=f"/api/v1/artifacts/{artifact.sha256}"),
        protocol=PRESETS[Preset(job.preset)],
    )


def _leased_job(session: Session, agent: Agent, job_id: int, lease_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id).with_for_update(of=Job))
    if job is None:
        raise NotFound(f"no job {job_id}", "job_id")
    if job.agent_id != agent.id:
        raise Forbidden(f"job {job_id} is not leased to this agent")
    if job.lease_id != lease_id:
        raise Conflict(f"lease {lease_id} of job {job_id} is stale: the job was re-leased", "lease_id")
    return job


def heartbeat(session: Session, agent: Agent, job_id: int, lease_id: str, lease_ttl_s: float) -> HeartbeatResponse:
    job = _leased_job(session, agent, job_id, lease_id)
    if job.status != JobStatus.running:
        raise Conflict(f"job {job_id} is {job.status.value}, not running", "lease_id")
    job.lease_expires_at = utcnow() + timedelta(seconds=lease_ttl_s)
    return HeartbeatResponse(lease_expires_at=job.lease_expires_at.isoformat(), cancel_requested=job.cancel_requested)


def measurement_flags(result: JobResult) -> list[str]:
    stats = result.stats
    assert stats is not None
    flags = []
    if stats.iqr_ms / stats.median_ms >= UNSTABLE_IQR_RATIO:
        flags.append("unstable")
    return flags


def record_result(session: Session, agent: Agent, job_id: int, result: JobResult) -> Job:
    """Store the agent's result; posting the same result twice is harmless."""
    job = _leased_job(session, agent, job_id, result.lease_id)
    if job.status in (JobStatus.done, JobStatus.failed, JobStatus.cancelled):
        return job
    if job.status != JobStatus.running:
        raise Conflict(f"job {job_id} is {job.status.value}, not running", "lease_id")
    now = utcnow()
    job.finished_at = now
    job.device.state = DeviceState.online
    job.device.last_seen = now
    if result.status is ResultStatus.failed:
        job.status = JobStatus.cancelled if result.failure_class == "cancelled" else JobStatus.failed
        job.error, job.failure_class = result.error, result.failure_class
        return job
    assert result.stats is not None
    provenance = {**result.provenance, "artifact_sha256": job.artifact_sha256, "preset": job.preset}
    if result.load_ms is not None:
        provenance["load_ms"] = result.load_ms
    if result.first_inference_ms is not None:
        provenance["first_inference_ms"] = result.first_inference_ms
    session.add(
        Measurement(
            device_id=job.device_id,
            architecture_id=job.architecture_id,
            artifact_sha256=job.artifact_sha256,
            job_id=job.id,
            latency_ms=result.stats.median_ms,
            stats=result.stats.model_dump(),
            samples_ms=result.samples_ms,
            flags=measurement_flags(result),
            provenance=provenance,
            source="measured",
        )
    )
    job.status = JobStatus.done
    return job
