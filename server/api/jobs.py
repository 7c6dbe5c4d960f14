"""Profiling jobs: submit and inspect (users), heartbeat and results (agents)."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Query, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.protocol import HeartbeatRequest, HeartbeatResponse, JobResult
from server.api.deps import CurrentAgent, Db, ServicesDep
from server.context import Services
from server.errors import Conflict, NotFound
from server.models import Artifact, Job, JobStatus, Measurement, utcnow
from server.schemas import JobIn, JobOut
from server.services import jobs as job_service
from server.services import onboarding as onboarding_service
from server.services.catalog import canonical_key, ensure_architecture, get_device, resolve_space

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])


def job_out(session: Session, job: Job) -> JobOut:
    measurement = session.scalar(select(Measurement).where(Measurement.job_id == job.id))
    return JobOut(
        id=job.id,
        device=job.device.name,
        space=job.architecture.space.name if job.architecture else None,
        architecture=job.architecture.key if job.architecture else None,
        artifact_sha256=job.artifact_sha256,
        preset=job.preset,
        priority=job.priority,
        status=job.status,
        attempts=job.attempts,
        error=job.error,
        failure_class=job.failure_class,
        measurement_id=measurement.id if measurement else None,
        latency_ms=measurement.latency_ms if measurement else None,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def _job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}", "job_id")
    return job


@router.post("", status_code=status.HTTP_201_CREATED)
def submit_job(body: JobIn, session: Db) -> JobOut:
    """Queue a measurement of an architecture (exported to ONNX when leased) or an uploaded artifact."""
    device = get_device(session, body.device)
    job = Job(device_id=device.id, preset=body.preset.value, priority=body.priority)
    if body.architecture is not None:
        assert body.space is not None
        space = resolve_space(body.space)
        job.architecture_id = ensure_architecture(session, space, canonical_key(space, body.architecture)).id
    else:
        if session.get(Artifact, body.artifact) is None:
            raise NotFound(f"no artifact {body.artifact}; upload it first (POST /api/v1/artifacts)", "artifact")
        job.artifact_sha256 = body.artifact
    session.add(job)
    session.flush()
    return job_out(session, job)


@router.get("")
def list_jobs(
    session: Db,
    device: str | None = None,
    status_: JobStatus | None = Query(None, alias="status"),
    cursor: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=1000),
) -> list[JobOut]:
    query = select(Job).where(Job.id > cursor).order_by(Job.id).limit(limit)
    if device is not None:
        query = query.where(Job.device_id == get_device(session, device).id)
    if status_ is not None:
        query = query.where(Job.status == status_)
    return [job_out(session, job) for job in session.scalars(query)]


@router.get("/{job_id}")
def read_job(job_id: int, session: Db) -> JobOut:
    return job_out(session, _job(session, job_id))


def _finish_onboarding_later(job: Job, services: Services, background: BackgroundTasks) -> None:
    """A finished job may be its onboarding's last: adapt (or record the failure) after the response."""
    if job.onboarding_id is not None:
        background.add_task(onboarding_service.finish_if_measured, services.sessions, services.predictors,
                            job.onboarding_id)


@router.post("/{job_id}/cancel")
def cancel_job(job_id: int, session: Db, services: ServicesDep, background: BackgroundTasks) -> JobOut:
    """Cancel a queued job at once; a running one is told to stop at its next heartbeat."""
    job = _job(session, job_id)
    if job.status == JobStatus.queued:
        job.status, job.finished_at = JobStatus.cancelled, utcnow()
        _finish_onboarding_later(job, services, background)
    elif job.status == JobStatus.running:
        job.cancel_requested = True
    else:
        raise Conflict(f"job {job_id} is already {job.status.value}", "job_id")
    return job_out(session, job)


@router.post("/{job_id}/heartbeat")
def heartbeat(job_id: int, body: HeartbeatRequest, session: Db, agent: CurrentAgent,
              services: ServicesDep) -> HeartbeatResponse:
    return job_service.heartbeat(session, agent, job_id, body.lease_id, services.settings.lease_ttl_s)


@router.post("/{job_id}/result")
def post_result(job_id: int, body: JobResult, session: Db, agent: CurrentAgent, services: ServicesDep,
                background: BackgroundTasks) -> JobOut:
    """Record an agent's result for a job it holds the lease of. Idempotent; 409 for a stale lease."""
    job = job_service.record_result(session, agent, job_id, body)
    _finish_onboarding_later(job, services, background)
    session.flush()
    return job_out(session, job)
