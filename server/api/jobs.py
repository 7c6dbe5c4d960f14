"""Profiling jobs: submit, list, inspect and cancel (users); heartbeat and results (agents)."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Query, status
from sqlalchemy import select

from agent.protocol import HeartbeatRequest, HeartbeatResponse, JobResult
from server.api.deps import Db, ServicesDep
from server.api.pagination import Cursor, page
from server.auth import READ, SUBMIT, AgentPrincipal
from server.context import Services
from server.models import Job, JobKind, JobStatus
from server.schemas import INT_MAX, JobIn, JobOut, Page, ResultOut, RowId
from server.services import jobs as job_service
from server.services import onboarding as onboarding_service
from server.services import results
from server.services.catalog import get_device

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[SUBMIT])
def submit_job(body: JobIn, session: Db, services: ServicesDep) -> JobOut:
    """Queue a measurement of an architecture (exported when leased) or an uploaded artifact, on a
    named device or on any device matching a selector. A valid earlier measurement of the same
    thing on the same device and preset is reused (`reused: true`) unless `force`."""
    return job_service.describe_job(session, job_service.submit_request(session, services.settings, body))


@router.get("", dependencies=[READ])
def list_jobs(
    session: Db,
    device: str | None = None,
    status_: JobStatus | None = Query(None, alias="status"),
    kind: JobKind | None = None,
    onboarding: int | None = Query(None, ge=1, le=INT_MAX, description="only the jobs of this onboarding"),
    cursor: Cursor = 0,
    limit: int = Query(100, ge=1, le=1000),
) -> Page[JobOut]:
    query = select(Job)
    if device is not None:
        query = query.where(Job.device_id == get_device(session, device).id)
    if status_ is not None:
        query = query.where(Job.status == status_)
    if kind is not None:
        query = query.where(Job.kind == kind)
    if onboarding is not None:
        query = query.where(Job.onboarding_id == onboarding)
    return page(session, query, Job.id, cursor, limit, lambda job: job_service.describe_job(session, job))


@router.get("/{job_id}", dependencies=[READ])
def read_job(job_id: RowId, session: Db) -> JobOut:
    return job_service.describe_job(session, job_service.get_job(session, job_id))


def _finish_onboarding_later(onboarding_id: int | None, services: Services, background: BackgroundTasks) -> None:
    """Queue the onboarding's adaptation after the commit, if its last job just finished."""
    if onboarding_id is not None:
        background.add_task(onboarding_service.finish_if_measured, services.sessions, onboarding_id)


@router.post("/{job_id}/cancel", dependencies=[SUBMIT])
def cancel_job(job_id: RowId, session: Db, services: ServicesDep, background: BackgroundTasks) -> JobOut:
    """Cancel a queued job at once; a running one is told to stop at its next heartbeat."""
    job = job_service.get_job(session, job_id)
    if job_service.cancel(job):
        _finish_onboarding_later(job.onboarding_id, services, background)
    return job_service.describe_job(session, job)


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
        results.record_and_lease_next, services.sessions, services.leases, services.settings, agent.agent_id, job_id,
        body, lease_next)
    _finish_onboarding_later(finished_onboarding, services, background)
    return recorded
