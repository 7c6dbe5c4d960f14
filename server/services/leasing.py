"""Leasing: hand a polling agent the most urgent job one of its idle devices may run.

Atomic on both backends: the job row is locked (`FOR UPDATE SKIP LOCKED` on Postgres) and flipped
from queued with a guarded UPDATE, and a partial unique index allows one running job per device;
losing either race means no lease this time, never a double one.

This is the farm's hottest path (every poll of every agent), so it runs statements built once, on
the session's connection, rather than ORM loads. Artifacts are content-addressed, so each is
described from memory after its first lease; an agent's `last_seen` is written at most every few
seconds.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TypeVar

import anyio
import anyio.to_thread
from sqlalchemy import Connection, and_, bindparam, case, exists, null, or_, select, union_all, update
from sqlalchemy.orm import Session, aliased

from agent.protocol import ARTIFACT_FORMATS, PRESETS, ArtifactFormat, ArtifactRef, JobLease, Preset, Runtime
from predictor.export import ExportUnavailable
from server import metrics
from server.background.wakeup import device_taken, jobs_changed
from server.db import AnyRow
from server.models import (
    Agent,
    AgentDevice,
    Architecture,
    Artifact,
    Device,
    DeviceState,
    Job,
    JobKind,
    JobStatus,
    as_utc,
    utcnow,
)
from server.services import selectors
from server.services.artifacts import ArtifactStore, export_pending, export_problem, materialise
from server.services.jobs import FREED_STATE
from server.settings import Settings

#: how many queued selector jobs one claim looks through for one its devices match
SELECTOR_SCAN = 50
#: an agent's `last_seen` is written at most this often (offline detection works in minutes)
LAST_SEEN_RESOLUTION_S = 5
#: artifact descriptions kept in memory (a few hundred bytes each)
ARTIFACTS_KEPT = 10_000
#: failure classes of an architecture job whose artifact this server has no exporter for, or
#: whose export failed
EXPORT_UNAVAILABLE = "export_unavailable"
EXPORT_FAILED = "export_error"
T = TypeVar("T")

_RUNNING = aliased(Job)
_QUEUED = aliased(Job)
#: devices of the agent (bound as `agent`) that may take a job now (degraded ones take canaries only)
_IDLE_DEVICES = and_(
    AgentDevice.agent_id == bindparam("agent"),
    Device.state.not_in([DeviceState.paused, DeviceState.retired]),
    ~exists().where(_RUNNING.device_id == Device.id, _RUNNING.status == JobStatus.running),
)
#: the next job of a device (in the claim order of `ix_jobs_queue`: one index row read)
_DEVICE_NEXT = (
    select(_QUEUED.id)
    .where(_QUEUED.status == JobStatus.queued, _QUEUED.device_id == Device.id,
           or_(Device.state != DeviceState.degraded, _QUEUED.kind == JobKind.canary))
    .order_by(_QUEUED.priority.desc(), _QUEUED.id)
    .limit(1)
    .correlate(Device)
    .scalar_subquery()
)
#: the most urgent of the next jobs of the agent's idle devices
_NAMED_JOBS = (
    select(Job.id, Job.priority, Job.device_id)
    .select_from(Device)
    .join(AgentDevice, AgentDevice.device_id == Device.id)
    .join(Job, Job.id == _DEVICE_NEXT)
    .where(_IDLE_DEVICES, Job.status == JobStatus.queued)
    .order_by(Job.priority.desc(), Job.id)
    .limit(1)
    .with_for_update(of=Job, skip_locked=True)
)
#: queued jobs for any device matching a selector, most urgent first
_SELECTOR_JOBS = (
    select(Job.id, Job.priority, Job.selector)
    .where(Job.status == JobStatus.queued, Job.device_id.is_(None))
    .order_by(Job.priority.desc(), Job.id)
    .limit(SELECTOR_SCAN)
    .with_for_update(of=Job, skip_locked=True)
)
_NAMED, _SELECTED = _NAMED_JOBS.cte("named"), _SELECTOR_JOBS.cte("selected")
#: both in one round trip: the named job (its `selector` null) and the selector jobs (`device_id` null)
_CANDIDATES = union_all(select(_NAMED.c.id, _NAMED.c.priority, _NAMED.c.device_id, null().label("selector")),
                        select(_SELECTED.c.id, _SELECTED.c.priority, null(), _SELECTED.c.selector))
#: the agent's idle, healthy devices, which selector jobs are matched against
_SELECTABLE_DEVICES = (
    select(Device).join(AgentDevice, AgentDevice.device_id == Device.id)
    .where(_IDLE_DEVICES, Device.state != DeviceState.degraded)
)
#: lease the chosen job for the chosen device (a selector job names none)
_LEASE_JOB = (
    update(Job)
    .where(Job.id == bindparam("job"), Job.status == JobStatus.queued)
    .values(status=JobStatus.running, device_id=bindparam("device"), agent_id=bindparam("agent"),
            lease_id=bindparam("lease"), lease_expires_at=bindparam("expires"), started_at=bindparam("now"),
            attempts=Job.attempts + 1, cancel_requested=False)
    .returning(Job.artifact_sha256, Job.architecture_id, Job.preset, Job.run_timeout_s, Job.kind, Job.created_at)
)
_MARK_BUSY = (
    update(Device)
    .where(Device.id == bindparam("device"))
    .values(last_seen=bindparam("now"), state=case(
        (Device.state.in_([DeviceState.online, DeviceState.offline]), DeviceState.busy), else_=Device.state))
    .returning(Device.name, Device.threads, Device.runtime, Device.attributes)
)
#: undo a lease nobody received: back to the queue as it was (a selector job names no device again)
_HAND_BACK_JOB = (
    update(Job)
    .where(Job.id == bindparam("job"), Job.lease_id == bindparam("lease"), Job.status == JobStatus.running)
    .values(status=JobStatus.queued, agent_id=None, lease_id=None, lease_expires_at=None, started_at=None,
            attempts=Job.attempts - 1, device_id=case((Job.selector.is_not(None), None), else_=Job.device_id))
)
_FREE_DEVICE = update(Device).where(Device.name == bindparam("device")).values(state=FREED_STATE).returning(Device.id)
_FAIL_JOB = (
    update(Job)
    .where(Job.id == bindparam("job"))
    .values(status=JobStatus.failed, error=bindparam("error"), failure_class=bindparam("failure"),
            finished_at=bindparam("now"), lease_id=None, lease_expires_at=None)
)
_TOUCH_AGENT = update(Agent).where(Agent.id == bindparam("agent")).values(last_seen=bindparam("now"))
_ARTIFACT = select(Artifact.sha256, Artifact.format, Artifact.size_bytes).where(Artifact.sha256 == bindparam("sha256"))

class Leases:
    """Leasing for one server process, which remembers the agents it saw lately and the artifacts
    it described (content-addressed, so never out of date)."""

    def __init__(self, store: ArtifactStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._touched: dict[int, float] = {}
        self._artifacts: dict[str, ArtifactRef] = {}
        self._threads: anyio.CapacityLimiter | None = None

    async def on_thread(self, work: Callable[..., T], *args: object) -> T:
        """Run an agent call's database work on one of the agents' worker threads."""
        if self._threads is None:  # made in the event loop, which does not exist before start-up
            self._threads = anyio.CapacityLimiter(self.settings.agent_threads)
        return await anyio.to_thread.run_sync(work, *args, limiter=self._threads)

    def claim(self, session: Session, agent_id: int) -> JobLease | None:
        """Lease the most urgent queued job one of the agent's idle devices may run, or None.
        Raises IntegrityError when another agent of the same device leased a job for it at the same
        moment; the session must then be rolled back."""
        conn = session.connection()
        self.touch(conn, agent_id)
        candidates = conn.execute(_CANDIDATES, {"agent": agent_id}).all()
        named = next(((row.id, row.priority, row.device_id) for row in candidates if row.selector is None), None)
        selector_jobs = [row for row in candidates if row.selector is not None]
        choice = _most_urgent(session, agent_id, named, selector_jobs) if selector_jobs else named
        if choice is None:
            return None
        job_id, _, device_id = choice
        # read after the candidate query saw the device idle, so after its previous job's finish time
        now = utcnow()
        lease_id, expires = str(uuid.uuid4()), now + timedelta(seconds=self.settings.lease_ttl_s)
        # raises IntegrityError when another agent of the same device won it a moment ago
        leased = conn.execute(_LEASE_JOB, {"job": job_id, "device": device_id, "agent": agent_id,
                                           "lease": lease_id, "expires": expires, "now": now}).first()
        if leased is None:
            return None
        metrics.JOB_WAIT.labels(leased.kind.value).observe((now - as_utc(leased.created_at)).total_seconds())
        device = conn.execute(_MARK_BUSY, {"device": device_id, "now": now}).one()
        device_taken(session, device_id)
        runtime = Runtime(device.runtime) if device.runtime in Runtime._value2member_map_ else Runtime.onnxruntime
        if leased.artifact_sha256 is not None:
            artifact = self._artifact(conn, leased.artifact_sha256)
        else:
            try:
                exported = self._exported(session, job_id, leased.architecture_id, runtime)
            except Exception as exc:  # noqa: BLE001 - the export's failure is the job's
                failure = EXPORT_UNAVAILABLE if isinstance(exc, ExportUnavailable) else EXPORT_FAILED
                conn.execute(_FAIL_JOB, {"job": job_id, "error": f"export: {exc}", "failure": failure, "now": now})
                conn.execute(_FREE_DEVICE, {"device": device.name})
                return None
            if exported is None:  # a slow export is running: the job waits in the queue, its attempt uncounted
                conn.execute(_HAND_BACK_JOB, {"job": job_id, "lease": lease_id})
                conn.execute(_FREE_DEVICE, {"device": device.name})
                return None
            artifact = exported
        provider = device.attributes.get("provider")
        return JobLease(
            job_id=job_id,
            lease_id=lease_id,
            lease_expires_at=expires.isoformat(),
            device=device.name,
            threads=device.threads or 1,
            runtime=runtime,
            provider=str(provider) if provider else None,
            artifact=artifact,
            protocol=PRESETS[Preset(leased.preset)].model_copy(
                update={"timeout_s": leased.run_timeout_s or self.settings.run_timeout_s}),
        )

    def hand_back(self, session: Session, lease: JobLease) -> None:
        """Return a lease the agent never received (its poll hung up while the claim ran) to the
        queue at once, its attempt uncounted, instead of after the lease expires."""
        conn = session.connection()
        if conn.execute(_HAND_BACK_JOB, {"job": lease.job_id, "lease": lease.lease_id}).rowcount:
            device_id = conn.execute(_FREE_DEVICE, {"device": lease.device}).scalar_one()
            jobs_changed(session, device_id)

    def touch(self, conn: Connection, agent_id: int) -> None:
        """Record that the agent is alive: a write (and a WAL flush) at most every few seconds."""
        now = time.monotonic()
        if now - self._touched.get(agent_id, -LAST_SEEN_RESOLUTION_S) >= LAST_SEEN_RESOLUTION_S:
            conn.execute(_TOUCH_AGENT, {"agent": agent_id, "now": utcnow()})
            self._touched[agent_id] = now

    def _artifact(self, conn: Connection, sha256: str) -> ArtifactRef:
        ref = self._artifacts.get(sha256)
        if ref is None:
            if len(self._artifacts) >= ARTIFACTS_KEPT:
                self._artifacts.clear()
            row = conn.execute(_ARTIFACT, {"sha256": sha256}).one()
            ref = self._artifacts[sha256] = ArtifactRef(
                sha256=row.sha256, format=ArtifactFormat(row.format), size_bytes=row.size_bytes,
                url=f"/api/v1/artifacts/{row.sha256}")
        return ref

    def _exported(self, session: Session, job_id: int, architecture_id: int, runtime: Runtime) -> ArtifactRef | None:
        """An architecture job's artifact, exported in the runtime's format on first use; None while
        a slow export of it runs. Raises ExportUnavailable when the format's exporter is missing."""
        fmt = ARTIFACT_FORMATS[runtime]
        problem = export_problem(fmt)
        if problem is not None:
            raise ExportUnavailable(problem)
        arch = session.get_one(Architecture, architecture_id)
        if export_pending(session, self.store, arch, fmt):
            return None
        artifact = materialise(session, self.store, arch, fmt)
        session.execute(update(Job).where(Job.id == job_id).values(artifact_sha256=artifact.sha256))
        return self._artifact(session.connection(), artifact.sha256)


def _most_urgent(session: Session, agent_id: int, named: tuple[int, int, int] | None,
                 selector_jobs: Sequence[AnyRow]) -> tuple[int, int, int] | None:
    """(job id, priority, device id) of the more urgent of the agent's `named` job and the first
    queued selector job one of its idle, healthy devices matches."""
    devices = session.scalars(_SELECTABLE_DEVICES, {"agent": agent_id}).all()
    matching = next(((job.id, job.priority, device.id) for job in selector_jobs
                     for device in devices if selectors.matches(job.selector, device)), None)
    if named is None or (matching is not None and (matching[1], -matching[0]) > (named[1], -named[0])):
        return matching
    return named
