"""Recording an agent's result for a job it holds the lease of.

With leasing, this is the farm's hot path (one result per job), so it runs statements built once
rather than ORM loads and flushes: lock the job, store the measurement, finish the job and free its
device. Only the rare outcomes load ORM objects: a retry after an infrastructure failure, a
canary's verdict, a canary falling due.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from agent.protocol import (
    INFRASTRUCTURE_FAILURES,
    PRESETS,
    JobResult,
    Preset,
    ResultStatus,
)
from agent.quality import quality_flags, trusted
from server import metrics
from server.background.wakeup import jobs_changed
from server.db import AnyRow, session_scope
from server.errors import Conflict
from server.models import (
    Architecture,
    Device,
    Job,
    JobKind,
    JobStatus,
    Measurement,
    SearchSpaceRow,
    as_utc,
    utcnow,
)
from server.schemas import JobOut, ResultOut
from server.services import health
from server.services.jobs import (
    FINISHED,
    FREED_STATE,
    check_lease,
    describe,
    queue_position,
    readapt_later,
    retry,
)
from server.services.leasing import Leases
from server.settings import Settings

#: the job, locked, with the names its description shows (labelled as `JobOut` fields)
_LOCKED_JOB = (
    select(Job.id, Job.kind, Job.selector, Job.architecture_id, Job.artifact_sha256, Job.preset, Job.priority,
           Job.status, Job.agent_id, Job.lease_id, Job.device_id, Job.attempts, Job.error, Job.failure_class,
           Job.measurement_id, Job.reused, Job.onboarding_id, Job.created_at, Job.started_at, Job.finished_at,
           Device.name.label("device"), Architecture.space_id, Architecture.key.label("architecture"),
           SearchSpaceRow.name.label("space"), Measurement.latency_ms, Measurement.flags,
           Measurement.valid)
    .outerjoin(Device, Device.id == Job.device_id)
    .outerjoin(Architecture, Architecture.id == Job.architecture_id)
    .outerjoin(SearchSpaceRow, SearchSpaceRow.id == Architecture.space_id)
    .outerjoin(Measurement, Measurement.id == Job.measurement_id)
    .where(Job.id == bindparam("job"))
    .with_for_update(of=Job)
)
_INSERT_MEASUREMENT = insert(Measurement).returning(Measurement.id)
_FINISH_JOB = (
    update(Job)
    .where(Job.id == bindparam("job"))
    .values(status=bindparam("status"), measurement_id=bindparam("measurement"), error=bindparam("error"),
            failure_class=bindparam("failure_class"), finished_at=bindparam("now"))
)
#: free the device; a measurement job (not a canary) counts towards the next canary
_RELEASE_DEVICE = (
    update(Device)
    .where(Device.id == bindparam("device"))
    .values(state=FREED_STATE, jobs_since_canary=Device.jobs_since_canary + bindparam("counted"))
    .returning(Device.jobs_since_canary)
)


@dataclass(frozen=True)
class Recorded:
    job: JobOut
    #: the job's onboarding, once the job finished (it may have been the onboarding's last)
    finished_onboarding: int | None


def record_and_lease_next(sessions: sessionmaker[Session], leases: Leases, settings: Settings, agent_id: int,
                          job_id: int, result: JobResult, lease_next: bool) -> tuple[ResultOut, int | None]:
    """The job after its result (with `lease_next`, the agent's next lease too, in the same
    transaction), and the job's onboarding if the job finished. One session, one thread hop."""
    try:
        return _record_in_session(sessions, leases, settings, agent_id, job_id, result, lease_next)
    except IntegrityError:
        # a concurrent request won a race: the next lease (another agent took the device), or, on
        # SQLite, whose SELECT ... FOR UPDATE locks nothing, the same result posted twice at once.
        # Recorded again, alone, the job reads as it now is: a repeat answers as the first did.
        return _record_in_session(sessions, leases, settings, agent_id, job_id, result, False)


def _record_in_session(sessions: sessionmaker[Session], leases: Leases, settings: Settings, agent_id: int,
                       job_id: int, result: JobResult, lease_next: bool) -> tuple[ResultOut, int | None]:
    with session_scope(sessions) as session:
        recorded = record_result(session, agent_id, job_id, result, settings)
        session.flush()  # a canary's verdict, before the next claim reads the device's state
        next_lease = leases.claim(session, agent_id) if lease_next else None
        # both parts are validated already
        return ResultOut.model_construct(**dict(recorded.job), next_lease=next_lease), recorded.finished_onboarding


def record_result(session: Session, agent_id: int, job_id: int, result: JobResult, settings: Settings) -> Recorded:
    """Store the agent's result; posting the same result twice is harmless.

    An infrastructure failure puts the job back in the queue (up to `max_attempts` tries); any
    other failure is the model's and is the job's result.
    """
    conn = session.connection()
    job = check_lease(conn.execute(_LOCKED_JOB, {"job": job_id}).one_or_none(), job_id, agent_id, result.lease_id)
    if job.status in FINISHED:
        return _recorded(job)
    if job.status is not JobStatus.running:
        raise Conflict(f"job {job_id} is {job.status.value}, not running", "lease_id")
    if result.status is ResultStatus.failed and result.failure_class in INFRASTRUCTURE_FAILURES:
        return _retry(session, job, result, settings)

    now = utcnow()
    measurement = _measurement(job, result) if result.status is ResultStatus.ok else None
    measurement_id = conn.execute(_INSERT_MEASUREMENT, measurement).scalar_one() if measurement else None
    if measurement is not None:  # an earlier attempt's error stays: it tells why the job was retried
        status, error, failure_class = JobStatus.done, job.error, job.failure_class
    else:
        status = JobStatus.cancelled if result.failure_class == "cancelled" else JobStatus.failed
        error, failure_class = result.error, result.failure_class
    conn.execute(_FINISH_JOB, {"job": job_id, "status": status, "measurement": measurement_id, "error": error,
                               "failure_class": failure_class, "now": now})
    _after_job(session, conn, job, measurement, f"{failure_class}: {error}", settings)
    if job.started_at is not None:
        metrics.JOB_RUN.labels(job.kind.value, status.value).observe((now - as_utc(job.started_at)).total_seconds())
    jobs_changed(session, job.device_id)
    return _recorded(job, status=status, error=error, failure_class=failure_class, finished_at=now,
                     measurement_id=measurement_id, latency_ms=measurement["latency_ms"] if measurement else None,
                     flags=measurement["flags"] if measurement else None,
                     valid=measurement["valid"] if measurement else None)


def _after_job(session: Session, conn: Connection, job: AnyRow, measurement: dict[str, Any] | None,
               failure: str, settings: Settings) -> None:
    """Free the device and look after its health; re-adapt its predictor on a new valid measurement."""
    is_canary = job.kind is JobKind.canary
    since_canary = conn.execute(_RELEASE_DEVICE,
                                {"device": job.device_id, "counted": 0 if is_canary else 1}).scalar_one()
    if is_canary:
        outcome = (measurement["latency_ms"], measurement["valid"]) if measurement else None
        health.judge_canary(session, session.get_one(Device, job.device_id), job.id, outcome, failure, settings)
    elif settings.canary_every and since_canary >= settings.canary_every:
        health.queue_canary(session, session.get_one(Device, job.device_id), settings)
    if (measurement is not None and measurement["valid"] and job.kind is JobKind.measure
            and job.onboarding_id is None and job.space_id is not None):
        readapt_later(session, job.space_id, job.device_id, settings)


def _retry(session: Session, job: AnyRow, result: JobResult, settings: Settings) -> Recorded:
    leased = session.get_one(Job, job.id)
    retry(leased, f"{result.failure_class}: {result.error}", settings.max_attempts, str(result.failure_class))
    jobs_changed(session, leased.device_id)  # None for a selector job: any matching device may take it
    return _recorded(job, status=leased.status, error=leased.error, failure_class=leased.failure_class,
                     finished_at=leased.finished_at, device=job.device if leased.device_id is not None else None,
                     queue_position=queue_position(session, leased))


def _recorded(job: AnyRow, **changes: Any) -> Recorded:
    described = describe({**job._mapping, "queue_position": None, **changes})
    return Recorded(described, job.onboarding_id if described.status in FINISHED else None)


def _measurement(job: AnyRow, result: JobResult) -> dict[str, Any]:
    assert result.stats is not None
    protocol = PRESETS[Preset(job.preset)]
    flags = quality_flags(result.samples_ms, protocol)
    provenance = {**result.provenance, "artifact_sha256": job.artifact_sha256, "preset": job.preset,
                  "protocol_version": result.protocol_version}
    for field in ("load_ms", "first_inference_ms", "warmup_runs"):
        if getattr(result, field) is not None:
            provenance[field] = getattr(result, field)
    return {"device_id": job.device_id, "architecture_id": job.architecture_id,
            "artifact_sha256": job.artifact_sha256, "job_id": job.id, "latency_ms": result.stats.median_ms,
            "stats": result.stats.model_dump(), "samples_ms": result.samples_ms, "flags": flags,
            "valid": trusted(result.samples_ms, protocol, flags),
            "preset": job.preset, "protocol_version": result.protocol_version, "provenance": provenance,
            "source": "measured"}
