"""Database schema: SQLAlchemy 2 typed models."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; they are stored in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class DeviceState(str, enum.Enum):
    online = "online"
    busy = "busy"
    paused = "paused"
    degraded = "degraded"
    offline = "offline"
    retired = "retired"


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


class JobKind(str, enum.Enum):
    measure = "measure"
    #: the device's fixed health-check architecture, measured at registration and every K jobs
    canary = "canary"


class Scope(str, enum.Enum):
    """What a token may do. The admin token holds every scope; agents hold `agent` alone."""

    read = "read"
    predict = "predict"
    submit = "submit"
    admin = "admin"
    agent = "agent"


class PredictorKind(str, enum.Enum):
    base = "base"
    adapted = "adapted"


class PredictorStatus(str, enum.Enum):
    ready = "ready"
    #: its device's canary drifted since it was fitted: still served, until a re-adaptation
    stale = "stale"


class OnboardingStatus(str, enum.Enum):
    measuring = "measuring"
    adapting = "adapting"
    ready = "ready"
    failed = "failed"


class TaskKind(str, enum.Enum):
    pretrain = "pretrain"
    adapt = "adapt"


class TaskStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(cls, native_enum=False, length=16, validate_strings=True)


class SearchSpaceRow(Base):
    __tablename__ = "search_spaces"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(32), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")


class Architecture(Base):
    __tablename__ = "architectures"
    __table_args__ = (UniqueConstraint("space_id", "key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    space_id: Mapped[int] = mapped_column(ForeignKey("search_spaces.id"))
    key: Mapped[str] = mapped_column(Text)
    #: index of the architecture in the published dataset it came from, if any
    dataset_index: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    space: Mapped[SearchSpaceRow] = relationship(lazy="joined")


class Artifact(Base):
    __tablename__ = "artifacts"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    architecture_id: Mapped[int | None] = mapped_column(ForeignKey("architectures.id"), index=True)
    format: Mapped[str] = mapped_column(String(16), default="onnx")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Agent(Base):
    __tablename__ = "agents"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    capabilities: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime | None]
    #: set by an admin: the token is refused from then on, and the agent serves no device
    revoked_at: Mapped[datetime | None]


class ClientToken(Base):
    """A token for NAS code and users, limited to `scopes` (read, predict, submit)."""

    __tablename__ = "client_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class RegistrationToken(Base):
    __tablename__ = "registration_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    used_at: Mapped[datetime | None]
    used_by_agent_id: Mapped[int | None] = mapped_column(ForeignKey("agents.id"))


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    hardware: Mapped[str] = mapped_column(String(256), default="")
    category: Mapped[str] = mapped_column(String(64), default="")
    runtime: Mapped[str] = mapped_column(String(64), default="")
    threads: Mapped[int | None]
    batch_size: Mapped[int | None]
    precision: Mapped[str] = mapped_column(String(16), default="")
    #: where the device's numbers come from: "imported" (a published table) or "agent"
    source: Mapped[str] = mapped_column(String(16), default="agent")
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[DeviceState] = mapped_column(_enum(DeviceState), default=DeviceState.offline)
    #: why the device is in its state, when it is not plain online/busy (e.g. the canary drift)
    state_reason: Mapped[str | None] = mapped_column(Text)
    last_seen: Mapped[datetime | None]
    #: the canary's first valid median: later canaries are compared with it
    canary_baseline_ms: Mapped[float | None]
    canary_last_ms: Mapped[float | None]
    jobs_since_canary: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    agents: Mapped[list[Agent]] = relationship(secondary="agent_devices", order_by="Agent.id")


class AgentDevice(Base):
    """Which agents serve which devices: several agents may serve one device name."""

    __tablename__ = "agent_devices"

    agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True, index=True)


_RUNNING = text("status = 'running'")
_QUEUED = text("status = 'queued'")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_claim", "status", "device_id", "priority", "id"),
        # each device's queue in claim order, so a claim reads one row however long the queue
        Index("ix_jobs_queue", "device_id", text("priority DESC"), "id", postgresql_where=_QUEUED,
              sqlite_where=_QUEUED),
        # at most one running job per device, whatever the agents do
        Index("uq_jobs_running_device", "device_id", unique=True, postgresql_where=_RUNNING, sqlite_where=_RUNNING),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind), default=JobKind.measure)
    #: set at submission, or at claim time for a job submitted with a `selector`
    device_id: Mapped[int | None] = mapped_column(ForeignKey("devices.id"))
    #: device attribute selector, e.g. `runtime == onnxruntime and threads == 1`
    selector: Mapped[str | None] = mapped_column(Text)
    architecture_id: Mapped[int | None] = mapped_column(ForeignKey("architectures.id"))
    artifact_sha256: Mapped[str | None] = mapped_column(ForeignKey("artifacts.sha256"))
    preset: Mapped[str] = mapped_column(String(16), default="standard")
    priority: Mapped[int] = mapped_column(default=0)
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus), default=JobStatus.queued)
    agent_id: Mapped[int | None] = mapped_column(ForeignKey("agents.id"))
    lease_id: Mapped[str | None] = mapped_column(String(36))
    lease_expires_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    force: Mapped[bool] = mapped_column(default=False)
    attempts: Mapped[int] = mapped_column(default=0)
    #: the queue deadline: a job not started by then fails with `queue_deadline`
    deadline_at: Mapped[datetime | None]
    #: the run timeout: a job running longer fails with `run_timeout`
    run_timeout_s: Mapped[float | None]
    #: the job's measurement: its own, or a valid earlier one it reused (`reused`)
    measurement_id: Mapped[int | None] = mapped_column(ForeignKey("measurements.id", use_alter=True))
    reused: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text)
    failure_class: Mapped[str | None] = mapped_column(String(64))
    onboarding_id: Mapped[int | None] = mapped_column(ForeignKey("onboardings.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    device: Mapped[Device | None] = relationship(lazy="joined")
    architecture: Mapped[Architecture | None] = relationship(lazy="joined")
    measurement: Mapped[Measurement | None] = relationship(foreign_keys=[measurement_id])


class Measurement(Base):
    __tablename__ = "measurements"
    __table_args__ = (
        Index("ix_measurements_device_arch", "device_id", "architecture_id"),
        Index("ix_measurements_device_artifact", "device_id", "artifact_sha256"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"))
    architecture_id: Mapped[int | None] = mapped_column(ForeignKey("architectures.id"))
    artifact_sha256: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), unique=True)
    #: the training label: median of the timed runs (or the published value)
    latency_ms: Mapped[float] = mapped_column(Float)
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    samples_ms: Mapped[list[Any] | None] = mapped_column(JSON)
    flags: Mapped[list[Any] | None] = mapped_column(JSON)
    #: no flag puts the median in doubt (`agent.quality.trusted`): trained on and reused instead of
    #: measuring again
    valid: Mapped[bool] = mapped_column(default=True)
    preset: Mapped[str | None] = mapped_column(String(16))
    protocol_version: Mapped[int | None]
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(16), default="measured")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Predictor(Base):
    __tablename__ = "predictors"
    # /predict's pick and every new valid measurement's re-adaptation check look a device up here
    __table_args__ = (Index("ix_predictors_device_space", "device_id", "space_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    space_id: Mapped[int] = mapped_column(ForeignKey("search_spaces.id"))
    kind: Mapped[PredictorKind] = mapped_column(_enum(PredictorKind))
    version: Mapped[int] = mapped_column(default=1)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("predictors.id"))
    device_id: Mapped[int | None] = mapped_column(ForeignKey("devices.id"))
    training_devices: Mapped[list[Any]] = mapped_column(default=list)
    status: Mapped[PredictorStatus] = mapped_column(_enum(PredictorStatus), default=PredictorStatus.ready)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: what it was trained on: measurement, device and architecture counts, their time range
    data_snapshot: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: a `torch.save` state dict, loaded only with `weights_only=True`
    checkpoint: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    space: Mapped[SearchSpaceRow] = relationship(lazy="joined")
    device: Mapped[Device | None] = relationship(lazy="joined")


class Onboarding(Base):
    __tablename__ = "onboardings"

    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"))
    space_id: Mapped[int] = mapped_column(ForeignKey("search_spaces.id"))
    sampler: Mapped[str] = mapped_column(String(32))
    samples: Mapped[int]
    preset: Mapped[str] = mapped_column(String(16), default="standard")
    #: active learning: measure more uncertain architectures, up to `budget` in all, until the
    #: predictor's mean relative uncertainty over the space is at most `target_uncertainty`
    budget: Mapped[int | None]
    target_uncertainty: Mapped[float | None]
    #: the collection whose members were sampled (space `onnx`); None: the whole space
    collection_id: Mapped[int | None] = mapped_column(ForeignKey("collections.id"))
    #: one entry per adaptation: samples used, mean relative uncertainty, predictor id
    rounds: Mapped[list[Any]] = mapped_column(default=list)
    status: Mapped[OnboardingStatus] = mapped_column(_enum(OnboardingStatus), default=OnboardingStatus.measuring)
    predictor_id: Mapped[int | None] = mapped_column(ForeignKey("predictors.id"))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    device: Mapped[Device] = relationship(lazy="joined")
    space: Mapped[SearchSpaceRow] = relationship(lazy="joined")
    collection: Mapped[Collection | None] = relationship()


class Collection(Base):
    """A named set of uploaded ONNX models (space `onnx`): a user's candidates."""

    __tablename__ = "collections"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    members: Mapped[list[CollectionMember]] = relationship(order_by="CollectionMember.position",
                                                           cascade="all, delete-orphan")


class CollectionMember(Base):
    __tablename__ = "collection_members"

    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), primary_key=True)
    artifact_sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256"), primary_key=True)
    #: the order the models were named in
    position: Mapped[int]


_PENDING_READAPT = text("status = 'queued' AND kind = 'adapt' AND onboarding_id IS NULL")


class TrainingTask(Base):
    """Pre-training or adaptation, claimed from the database by a worker (several may share it)."""

    __tablename__ = "training_tasks"
    __table_args__ = (
        Index("ix_training_tasks_claim", "status", "not_before", "id"),
        # one pending re-adaptation per device and space: new measurements push it back instead
        Index("uq_training_tasks_pending_adapt", "space_id", "device_id", unique=True,
              postgresql_where=_PENDING_READAPT, sqlite_where=_PENDING_READAPT),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[TaskKind] = mapped_column(_enum(TaskKind))
    status: Mapped[TaskStatus] = mapped_column(_enum(TaskStatus), default=TaskStatus.queued)
    space_id: Mapped[int] = mapped_column(ForeignKey("search_spaces.id"))
    device_id: Mapped[int | None] = mapped_column(ForeignKey("devices.id"))
    onboarding_id: Mapped[int | None] = mapped_column(ForeignKey("onboardings.id"), index=True)
    #: pre-training: reference devices and seed
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: not claimed before this moment (re-adaptation waits for measurements to settle)
    not_before: Mapped[datetime] = mapped_column(default=utcnow)
    worker: Mapped[str | None] = mapped_column(String(128))
    #: a running task whose worker stopped renewing this is claimed again
    lease_expires_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(default=0)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    predictor_id: Mapped[int | None] = mapped_column(ForeignKey("predictors.id"))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    space: Mapped[SearchSpaceRow] = relationship(lazy="joined")
    device: Mapped[Device | None] = relationship(lazy="joined")
