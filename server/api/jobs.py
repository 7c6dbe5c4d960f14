"""Profiling jobs: submit, list, inspect and cancel (users); heartbeat and results (agents)."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Query, status
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from agent.protocol import HeartbeatRequest, HeartbeatResponse, JobResult
from server.api.deps import Db, ServicesDep
from server.auth import READ, SUBMIT, AgentPrincipal
from server.context import Services
from server.db import session_scope
from server.errors import Conflict, NotFound
from server.models import Artifact, Job, JobKind, JobStatus, utcnow
from server.schemas import INT_MAX, JobIn, JobOut, ResultOut, RowId
from server.services import jobs as job_service
from server.services import onboarding as onboarding_service
from server.services import results
from server.services.catalog import canonical_key, ensure_architecture, get_device, resolve_space

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])


def job_out(session: Session, job: Job) -> JobOut:
    measurement = job.measurement
    return JobOut(
        id=job.id,
        kind=job.kind,
        device=job.device.name if job.device else None,
        selector=job.selector,
        space=job.architecture.space.name if job.architecture else None,
        architecture=job.architecture.key if job.architecture else None,
        artifact_sha256=job.artifact_sha256,
        preset=job.preset,
        priority=job.priority,
        status=job.status,
        queue_position=job_service.queue_position(session, job),
        attempts=job.attempts,
        error=job.error,
        failure_class=job.failure_class,
        measurement_id=job.measurement_id,
        reused=job.reused,
        latency_ms=measurement.latency_ms if measurement else None,
        flags=measurement.flags if measurement else None,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def _job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}", "job_id")
    return job


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[SUBMIT])
def submit_job(body: JobIn, session: Db, services: ServicesDep) -> JobOut:
    """Queue a measurement of an architecture (exported when leased) or an uploaded artifact, on a
    named device or on any device matching a selector. A valid earlier measurement of the same
    thing on the same device and preset is reused (`reused: true`) unless `force`."""
    if body.architecture is not None:
        assert body.space is not None
        space = resolve_space(body.space)
        target = job_service.Target(architecture_id=ensure_architecture(
            session, space, canonical_key(space, body.architecture)).id)
    else:
        if session.get(Artifact, body.artifact) is None:
            raise NotFound(f"no artifact {body.artifact}; upload it first (POST /api/v1/artifacts)", "artifact")
        target = job_service.Target(artifact_sha256=body.artifact)
    job = job_service.submit(
        session, services.settings, target, device=get_device(session, body.device) if body.device else None,
        selector=body.selector, preset=body.preset, priority=body.priority, force=body.force,
        queue_deadline_s=body.queue_deadline_s, run_timeout_s=body.run_timeout_s,
    )
    return job_out(session, job)


@router.get("", dependencies=[READ])
def list_jobs(
    session: Db,
    device: str | None = None,
    status_: JobStatus | None = Query(None, alias="status"),
    kind: JobKind | None = None,
    onboarding: int | None = Query(None, ge=1, le=INT_MAX, description="only the jobs of this onboarding"),
    cursor: int = Query(0, ge=0, le=INT_MAX, description="only jobs with a larger id"),
    limit: int = Query(100, ge=1, le=1000),
) -> list[JobOut]:
    query = select(Job).where(Job.id > cursor).order_by(Job.id).limit(limit)
    if device is not None:
        query = query.where(Job.device_id == get_device(session, device).id)
    if status_ is not None:
        query = query.where(Job.status == status_)
    if kind is not None:
        query = query.where(Job.kind == kind)
    if onboarding is not None:
        query = query.where(Job.onboarding_id == onboarding)
    return [job_out(session, job) for job in session.scalars(query)]


@router.get("/{job_id}", dependencies=[READ])
def read_job(job_id: RowId, session: Db) -> JobOut:
    return job_out(session, _job(session, job_id))


def _finish_onboarding_later(onboarding_id: int | None, services: Services, background: BackgroundTasks) -> None:
    """Queue the onboarding's adaptation after the commit, if its last job just finished."""
    if onboarding_id is not None:
        background.add_task(onboarding_service.finish_if_measured, services.sessions, onboarding_id)


@router.post("/{job_id}/cancel", dependencies=[SUBMIT])
def cancel_job(job_id: RowId, session: Db, services: ServicesDep, background: BackgroundTasks) -> JobOut:
    """Cancel a queued job at once; a running one is told to stop at its next heartbeat."""
    job = _job(session, job_id)
    if job.status == JobStatus.queued:
        job.status, job.finished_at = JobStatus.cancelled, utcnow()
        _finish_onboarding_later(job.onboarding_id, services, background)
    elif job.status == JobStatus.running:
        job.cancel_requested = True
    else:
        raise Conflict(f"job {job_id} is already {job.status.value}", "job_id")
    return job_out(session, job)


@router.post("/{job_id}/heartbeat")
def heartbeat(job_id: RowId, body: HeartbeatRequest, session: Db, agent: AgentPrincipal,
              services: ServicesDep) -> HeartbeatResponse:
    """Extend the lease; the answer says whether the job should stop. 409 for a stale lease."""
    assert agent.agent_id is not None
    extended = job_service.heartbeat(session, agent.agent_id, job_id, body.lease_id, services.settings.lease_ttl_s)
    services.leases.touch(session.connection(), agent.agent_id)  # once the lease held: a refusal rolls back
    return extended


@router.post("/{job_id}/result")
async def post_result(job_id: RowId, body: JobResult, agent: AgentPrincipal, services: ServicesDep,
                      background: BackgroundTasks,
                      lease_next: bool = Query(False, description="also lease the agent's next job, if one is "
                                                                  "queued, in the same transaction")) -> ResultOut:
    """Record an agent's result for a job it holds the lease of. Idempotent; 409 for a stale lease.
    With `lease_next`, the answer carries the agent's next lease too: one round trip per job
    instead of two, and no other agent of the device is woken for a moment it is free."""
    assert agent.agent_id is not None
    recorded, finished_onboarding = await services.leases.on_thread(
        _record_result, services, agent.agent_id, job_id, body, lease_next)
    _finish_onboarding_later(finished_onboarding, services, background)
    return recorded


def _record_result(services: Services, agent_id: int, job_id: int, body: JobResult,
                   lease_next: bool) -> tuple[ResultOut, int | None]:
    """The job after its result (and the next lease), and the job's onboarding if the job finished
    (it may have been the onboarding's last). One session and one worker-thread hop."""
    try:
        return _record_in_session(services, agent_id, job_id, body, lease_next)
    except IntegrityError:
        if not lease_next:
            raise
    # the next lease lost a race for one of the agent's other devices: the result alone, then
    return _record_in_session(services, agent_id, job_id, body, False)


def _record_in_session(services: Services, agent_id: int, job_id: int, body: JobResult,
                       lease_next: bool) -> tuple[ResultOut, int | None]:
    with session_scope(services.sessions) as session:
        recorded = results.record_result(session, agent_id, job_id, body, services.settings)
        session.flush()  # a canary's verdict, before the next claim reads the device's state
        next_lease = services.leases.claim(session, agent_id) if lease_next else None
        # both parts are validated already
        return ResultOut.model_construct(**dict(recorded.job), next_lease=next_lease), recorded.finished_onboarding
