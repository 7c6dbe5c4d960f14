"""What the dashboard reads from the database: plain dataclasses, so templates never touch a session."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, selectinload

from server.models import (
    Agent,
    AgentDevice,
    Architecture,
    Device,
    Job,
    JobKind,
    JobStatus,
    Measurement,
    Predictor,
    SearchSpaceRow,
    as_utc,
)
from server.services.predictors import NO_CHECKPOINT

#: canary runs shown in a device row's sparkline
SPARKLINE_RUNS = 30
QUEUE_ROWS = 200
FAILURE_ROWS = 50
RECENT_ROWS = 20


@dataclass(frozen=True)
class CanaryRun:
    job_id: int
    median_ms: float
    valid: bool
    at: datetime


@dataclass(frozen=True)
class JobRow:
    id: int
    kind: str
    status: str
    device: str | None
    selector: str | None
    space: str | None
    #: the architecture key, or the uploaded artifact's sha256
    target: str
    preset: str
    priority: int
    attempts: int
    latency_ms: float | None
    flags: list[str]
    reused: bool
    failure_class: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class DeviceRow:
    name: str
    state: str
    state_reason: str | None
    source: str
    hardware: str
    category: str
    runtime: str
    threads: int | None
    batch_size: int | None
    precision: str
    last_seen: datetime | None
    agents: list[str]
    measurements: int
    canary_baseline_ms: float | None
    canary_last_ms: float | None
    current_job: JobRow | None = None
    canary: list[CanaryRun] = field(default_factory=list)

    @property
    def canary_drift(self) -> float | None:
        if self.canary_baseline_ms and self.canary_last_ms is not None:
            return self.canary_last_ms / self.canary_baseline_ms - 1
        return None


@dataclass(frozen=True)
class AgentRow:
    name: str
    last_seen: datetime | None
    #: from the agent's capability report
    cpu: str
    runtimes: str
    version: str


@dataclass(frozen=True)
class PredictorRow:
    id: int
    kind: str
    space: str
    version: int
    status: str
    device: str | None
    parent_id: int | None
    training_devices: list[str]
    metrics: dict[str, Any]
    created_at: datetime

    @property
    def validation(self) -> dict[str, Any]:
        value = self.metrics.get("validation")
        return value if isinstance(value, dict) else {}

    @property
    def points(self) -> list[tuple[float, float]]:
        """(measured ms, predicted ms) pairs of the validation set; malformed entries are skipped."""
        return [(float(p[0]), float(p[1])) for p in self.validation.get("points") or []
                if isinstance(p, (list, tuple)) and len(p) == 2]

    @property
    def curve(self) -> list[tuple[int, float]]:
        """(adaptation samples, validation rho) pairs, by samples."""
        value = self.metrics.get("curve")
        entries = value if isinstance(value, list) else []
        return sorted((int(e["samples"]), float(e["spearman"])) for e in entries
                      if isinstance(e, dict) and e.get("samples") is not None and e.get("spearman") is not None)


def _utc(moment: datetime | None) -> datetime | None:
    return as_utc(moment) if moment is not None else None


def _job_row(job: Job, measurement: Measurement | None) -> JobRow:
    return JobRow(
        id=job.id, kind=job.kind.value, status=job.status.value, device=job.device.name if job.device else None,
        selector=job.selector, space=job.architecture.space.name if job.architecture else None,
        target=job.architecture.key if job.architecture else job.artifact_sha256 or "",
        preset=job.preset, priority=job.priority, attempts=job.attempts,
        latency_ms=measurement.latency_ms if measurement else None,
        flags=list(measurement.flags or []) if measurement else [], reused=job.reused,
        failure_class=job.failure_class, error=job.error, created_at=as_utc(job.created_at),
        started_at=_utc(job.started_at), finished_at=_utc(job.finished_at),
    )


def _jobs(session: Session, query: Select[Job]) -> list[JobRow]:
    rows = session.execute(query.add_columns(Measurement).outerjoin(Measurement, Measurement.id == Job.measurement_id))
    return [_job_row(job, measurement) for job, measurement in rows]


def _canary_runs(session: Session, device_id: int | None = None) -> dict[int, list[CanaryRun]]:
    query = (
        select(Job.device_id, Job.id, Measurement.latency_ms, Measurement.valid, Job.finished_at)
        .join(Measurement, Measurement.id == Job.measurement_id)
        .where(Job.kind == JobKind.canary, Job.status == JobStatus.done)
        .order_by(Job.finished_at, Job.id)
    )
    if device_id is not None:
        query = query.where(Job.device_id == device_id)
    runs: dict[int, list[CanaryRun]] = defaultdict(list)
    for device, job_id, ms, valid, at in session.execute(query):
        assert device is not None and at is not None  # a finished canary ran on a device
        runs[device].append(CanaryRun(job_id, ms, valid, as_utc(at)))
    return runs


def _device_row(device: Device, measurements: int, current: JobRow | None, canary: list[CanaryRun]) -> DeviceRow:
    return DeviceRow(
        name=device.name, state=device.state.value, state_reason=device.state_reason, source=device.source,
        hardware=device.hardware, category=device.category, runtime=device.runtime, threads=device.threads,
        batch_size=device.batch_size, precision=device.precision, last_seen=_utc(device.last_seen),
        agents=[agent.name for agent in device.agents], measurements=measurements,
        canary_baseline_ms=device.canary_baseline_ms, canary_last_ms=device.canary_last_ms,
        current_job=current, canary=canary,
    )


def devices(session: Session) -> list[DeviceRow]:
    counts = dict(session.execute(select(Measurement.device_id, func.count()).group_by(Measurement.device_id)).all())
    running = {job.device: job for job in _jobs(session, select(Job).where(Job.status == JobStatus.running))}
    canaries = _canary_runs(session)
    return [
        _device_row(device, counts.get(device.id, 0), running.get(device.name),
                    canaries.get(device.id, [])[-SPARKLINE_RUNS:])
        for device in session.scalars(select(Device).options(selectinload(Device.agents)).order_by(Device.name))
    ]


def device(session: Session, name: str) -> DeviceRow | None:
    row = session.scalar(select(Device).where(Device.name == name))
    if row is None:
        return None
    count = session.scalar(select(func.count()).where(Measurement.device_id == row.id)) or 0
    current = _jobs(session, select(Job).where(Job.device_id == row.id, Job.status == JobStatus.running))
    return _device_row(row, count, current[0] if current else None, _canary_runs(session, row.id).get(row.id, []))


def device_agents(session: Session, name: str) -> list[AgentRow]:
    query = (
        select(Agent)
        .join(AgentDevice, AgentDevice.agent_id == Agent.id)
        .join(Device, Device.id == AgentDevice.device_id)
        .where(Device.name == name)
        .order_by(Agent.id)
    )
    return [_agent_row(agent) for agent in session.scalars(query)]


def _agent_row(agent: Agent) -> AgentRow:
    report = agent.capabilities if isinstance(agent.capabilities, dict) else {}
    runtimes = report.get("runtimes")
    runtimes = runtimes if isinstance(runtimes, dict) else {}
    cores = report.get("cpu_cores")
    return AgentRow(
        name=agent.name, last_seen=_utc(agent.last_seen),
        cpu=f"{report.get('cpu_model', '')}{f' ({cores} cores)' if cores else ''}",
        runtimes=", ".join(f"{name} {version}" for name, version in sorted(runtimes.items())),
        version=str(report.get("agent_version", "")),
    )


def latencies_by_space(session: Session, name: str) -> dict[str, list[float]]:
    """Every measured median of the device, by search space ("uploaded" for ONNX uploads)."""
    query = (
        select(SearchSpaceRow.name, Measurement.latency_ms)
        .join(Device, Device.id == Measurement.device_id)
        .outerjoin(Architecture, Architecture.id == Measurement.architecture_id)
        .outerjoin(SearchSpaceRow, SearchSpaceRow.id == Architecture.space_id)
        .where(Device.name == name)
    )
    by_space: dict[str, list[float]] = defaultdict(list)
    for space, ms in session.execute(query):
        by_space[space or "uploaded"].append(ms)
    return dict(sorted(by_space.items()))


def device_jobs(session: Session, name: str, limit: int = RECENT_ROWS) -> list[JobRow]:
    return _jobs(session, select(Job).join(Device, Device.id == Job.device_id).where(Device.name == name)
                 .order_by(Job.id.desc()).limit(limit))


def job_counts(session: Session) -> dict[str, dict[str, int]]:
    """status -> kind -> count, statuses in lifecycle order."""
    counts: dict[str, dict[str, int]] = {status.value: {} for status in JobStatus}
    by_status_and_kind = select(Job.status, Job.kind, func.count()).group_by(Job.status, Job.kind)
    for status, kind, count in session.execute(by_status_and_kind):
        counts[status.value][kind.value] = count
    return counts


def queue(session: Session) -> list[JobRow]:
    """Running jobs, then queued ones in the order agents claim them."""
    return _jobs(session, select(Job).where(Job.status.in_([JobStatus.running, JobStatus.queued]))
                 .order_by((Job.status == JobStatus.running).desc(), Job.priority.desc(), Job.id).limit(QUEUE_ROWS))


def failures(session: Session) -> list[JobRow]:
    return _jobs(session, select(Job).where(Job.status == JobStatus.failed)
                 .order_by(Job.finished_at.desc(), Job.id.desc()).limit(FAILURE_ROWS))


def finished(session: Session) -> list[JobRow]:
    return _jobs(session, select(Job).where(Job.status == JobStatus.done)
                 .order_by(Job.finished_at.desc(), Job.id.desc()).limit(RECENT_ROWS))


def _predictor_row(row: Predictor) -> PredictorRow:
    return PredictorRow(
        id=row.id, kind=row.kind.value, space=row.space.name, version=row.version, status=row.status.value,
        device=row.device.name if row.device else None, parent_id=row.parent_id,
        training_devices=list(row.training_devices), metrics=dict(row.metrics), created_at=as_utc(row.created_at),
    )


def predictors(session: Session, device_name: str | None = None) -> list[PredictorRow]:
    query = select(Predictor).options(NO_CHECKPOINT).order_by(Predictor.id.desc())
    if device_name is not None:
        query = query.where(Predictor.device.has(Device.name == device_name))
    return [_predictor_row(row) for row in session.scalars(query)]


def predictor(session: Session, predictor_id: int) -> PredictorRow | None:
    row = session.get(Predictor, predictor_id, options=[NO_CHECKPOINT])
    return _predictor_row(row) if row is not None else None
