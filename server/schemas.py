"""Request and response bodies of the HTTP API (agent wire schemas live in agent.protocol)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.protocol import JobLease, Number, Preset
from predictor.explain import OpCost, Resemblance
from server.models import (
    DeviceState,
    JobKind,
    JobStatus,
    OnboardingStatus,
    PredictorKind,
    PredictorStatus,
    Scope,
    TaskKind,
    TaskStatus,
    as_utc,
)


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("latency must be a number of milliseconds greater than 0")
    return value


LatencyMs = Annotated[Number, AfterValidator(_positive)]
#: how deeply a free-form JSON value (device attributes) may nest
JSON_MAX_DEPTH = 32


def _plain_json(value: dict[str, Any]) -> dict[str, Any]:
    """Free-form JSON as both backends store and every client parses it: nested at most
    JSON_MAX_DEPTH deep (deeper broke the answer's serialisation), numbers finite."""
    pending: list[tuple[object, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError("numbers must be finite (no NaN or Infinity)")
        if isinstance(item, (dict, list)):
            if depth > JSON_MAX_DEPTH:
                raise ValueError(f"nested more than {JSON_MAX_DEPTH} levels deep")
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_plain_json)]
ArchKey = Annotated[str, Field(min_length=1, max_length=4096)]
DeviceName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")]
#: answered with its UTC offset, as an OpenAPI date-time must be (SQLite hands back naive datetimes)
Timestamp = Annotated[datetime, AfterValidator(as_utc)]
#: the largest value an INTEGER column holds (on Postgres)
INT_MAX = 2**31 - 1
#: the id of a row (ids count from 1): SQLite cannot even bind an int beyond 64 bits
RowId = Annotated[int, Field(ge=1, le=INT_MAX)]
#: what both numpy's and torch's generators take as a seed
Seed = Annotated[int, Field(ge=0, le=2**64 - 1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: int | None = Field(description="pass as `cursor` for the next page; null on the last")


# the lengths of the device columns: the same 422 on SQLite (which would store longer) and Postgres
Hardware = Annotated[str, Field(max_length=256)]
Category = Annotated[str, Field(max_length=64)]


class DeviceIn(Strict):
    name: DeviceName
    hardware: Hardware = ""
    category: Category = ""
    runtime: Annotated[str, Field(max_length=64)] = ""
    threads: int | None = Field(default=None, ge=1, le=INT_MAX)
    batch_size: int | None = Field(default=None, ge=1, le=INT_MAX)
    precision: Annotated[str, Field(max_length=16)] = ""
    attributes: JsonObject = Field(default_factory=dict)


class DevicePatch(Strict):
    hardware: Hardware | None = None
    category: Category | None = None
    state: DeviceState | None = None
    attributes: JsonObject | None = None


class DeviceOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    hardware: str
    category: str
    runtime: str
    threads: int | None
    batch_size: int | None
    precision: str
    source: str
    attributes: dict[str, Any]
    state: DeviceState
    state_reason: str | None
    agents: list[int] = Field(description="ids of the agents serving the device")
    last_seen: Timestamp | None
    canary_baseline_ms: float | None
    canary_last_ms: float | None

    @field_validator("agents", mode="before")
    @classmethod
    def _agent_ids(cls, agents: list[Any]) -> list[int]:
        return [agent if isinstance(agent, int) else agent.id for agent in agents]


class ArchitectureIn(Strict):
    space: str
    key: ArchKey


class ArchitectureOut(BaseModel):
    id: int
    space: str
    key: str
    dataset_index: int | None


class ArtifactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    sha256: str
    format: str
    size_bytes: int
    architecture_id: int | None


class MeasurementRow(Strict):
    architecture: ArchKey
    latency_ms: LatencyMs


class MeasurementImport(Strict):
    device: DeviceName
    space: str
    rows: list[MeasurementRow] = Field(min_length=1, max_length=100_000)


class ImportSummary(BaseModel):
    device: str
    space: str
    inserted: int
    architectures_created: int


class MeasurementOut(BaseModel):
    id: int
    device: str
    space: str | None
    architecture: str | None
    artifact_sha256: str | None
    latency_ms: float
    source: str
    stats: dict[str, Any] | None
    flags: list[Any] | None
    valid: bool = Field(description="trained on and reused: no flag puts the median in doubt (`short` does not)")
    provenance: dict[str, Any] | None
    job_id: int | None
    created_at: Timestamp | None


class JobIn(Strict):
    device: DeviceName | None = None
    selector: str | None = Field(
        default=None, max_length=1000, examples=["runtime == onnxruntime and threads == 1"],
        description="run on any device whose attributes match, instead of a named `device`",
    )
    space: str | None = None
    architecture: ArchKey | None = None
    artifact: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    preset: Preset = Preset.standard
    priority: int = Field(default=0, ge=-1000, le=1000)
    force: bool = Field(default=False, description="measure again even when a valid measurement exists")
    queue_deadline_s: float | None = Field(default=None, gt=0, le=30 * 86_400,
                                           description="fail the job if it has not started by then")
    run_timeout_s: float | None = Field(default=None, gt=0, le=86_400,
                                        description="fail the job if it runs longer (default: server setting)")

    @model_validator(mode="after")
    def _one_target(self) -> JobIn:
        if (self.architecture is None) == (self.artifact is None):
            raise ValueError("give exactly one of `architecture` (with `space`) or `artifact`")
        if self.architecture is not None and self.space is None:
            raise ValueError("`architecture` needs `space`")
        if (self.device is None) == (self.selector is None):
            raise ValueError("give exactly one of `device` or `selector`")
        return self


class JobOut(BaseModel):
    id: int
    kind: JobKind
    device: str | None
    selector: str | None
    space: str | None
    architecture: str | None
    artifact_sha256: str | None
    preset: str
    priority: int
    status: JobStatus
    queue_position: int | None = Field(description="queued jobs ahead of this one; null unless queued")
    attempts: int
    error: str | None
    failure_class: str | None
    measurement_id: int | None
    reused: bool = Field(description="the measurement is an earlier valid one, not measured for this job")
    latency_ms: float | None
    flags: list[str] | None
    valid: bool | None = Field(description="the measurement is trained on and reused (no flag puts its median in "
                               "doubt; `short` does not); null without a measurement")
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None


class ResultOut(JobOut):
    next_lease: JobLease | None = Field(
        None, description="with `lease_next=true`: the agent's next job, leased in the same transaction; "
                          "null when none is queued for its idle devices (then it long-polls as usual)")


class RegistrationTokenOut(BaseModel):
    token: str


class AgentOut(BaseModel):
    id: int
    name: str
    devices: list[str] = Field(description="names of the devices the agent's token serves")
    created_at: Timestamp
    last_seen: Timestamp | None
    revoked_at: Timestamp | None


class ClientTokenIn(Strict):
    name: str = Field(min_length=1, max_length=128)
    scopes: list[Literal[Scope.read, Scope.predict, Scope.submit]] = Field(min_length=1)


class ClientTokenOut(BaseModel):
    id: int
    name: str
    scopes: list[Scope]
    created_at: Timestamp
    revoked_at: Timestamp | None
    token: str | None = Field(default=None, description="shown once, when the token is created")


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
CollectionName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class PredictIn(Strict):
    device: DeviceName
    space: str = Field(default="nb201", description='the space of the architectures; "onnx" for uploaded models')
    architectures: list[ArchKey] | Literal["all"] | None = Field(
        default=None, description='canonical keys (sha256s of uploaded models in space "onnx"), or "all" for '
                                  'every architecture of an enumerable space'
    )
    collection: CollectionName | None = Field(default=None, description="every member of a collection (space onnx)")
    predictor_id: RowId | None = None

    @model_validator(mode="after")
    def _one_target(self) -> PredictIn:
        if (self.architectures is None) == (self.collection is None):
            raise ValueError("name either `architectures` or a `collection`")
        if self.collection is not None:
            self.space = "onnx"
        return self


class CollectionIn(Strict):
    name: CollectionName
    artifacts: list[Sha256] = Field(min_length=1, max_length=10_000,
                                    description="sha256s of uploaded ONNX models (POST /api/v1/artifacts)")


class CollectionOut(BaseModel):
    name: str
    artifacts: list[str]
    created_at: Timestamp


class PredictOut(BaseModel):
    device: str
    space: str
    predictor_id: int
    predictor_version: int
    predictor_kind: PredictorKind
    #: `stale`: the device's canary drifted since this predictor was fitted
    predictor_status: PredictorStatus
    architectures: list[str]
    latency_ms: list[float]
    uncertainty_ms: list[float]


class SpaceOut(BaseModel):
    name: str
    description: str
    size: int | None = Field(description="how many architectures the space holds; null where it is unbounded "
                                         "(space onnx: whatever models were uploaded)")
    key_format: str = Field(description="what a key of the space looks like, with an example")
    example_key: str | None = Field(description="one key of the space; null for an unbounded space")
    has_reference_tables: bool = Field(description="published latency tables ship for it (`latfarm datasets import`)")
    builds_networks: bool = Field(description="the farm builds and exports each key itself; else models are uploaded")
    graph_encoded: bool = Field(description="encoded from its ONNX graphs: its base predictor pre-trains on the "
                                            "reference spaces' exports, so it needs no reference table")
    reference_devices: list[str] = Field(description="imported devices its base predictor can pre-train on: those "
                                                     "of its own tables, or of the reference spaces if graph-encoded")
    base_predictor_id: int | None = Field(description="the latest base predictor; null: pre-train one first")


class PredictorOut(BaseModel):
    id: int
    space: str
    kind: PredictorKind
    version: int
    parent_id: int | None
    device: str | None
    status: PredictorStatus
    training_devices: list[str]
    metrics: dict[str, Any] = Field(
        description="training figures; adapted predictors add `validation` (spearman, mape and "
                    "(measured, predicted) points on measurements they did not see) and `curve` "
                    "(validation spearman by number of samples)"
    )
    data_snapshot: dict[str, Any] = Field(description="measurements trained on: counts and time range")
    created_at: Timestamp


class PretrainIn(Strict):
    space: str
    devices: list[DeviceName] | None = Field(
        default=None, description="reference devices to train on; default: every imported device of the space"
    )
    seed: Seed = 0
    archs_per_space: int | None = Field(
        default=None, ge=10, le=20_000,
        description="graph-encoded spaces only (`onnx`, and installed spaces without reference tables): "
                    "architectures of each reference space's table exported to ONNX and trained on (default 300)",
    )


class OnboardIn(Strict):
    space: str = "nb201"
    collection: CollectionName | None = Field(
        default=None, description="sample the members of this collection (space onnx) instead of the whole space"
    )
    samples: int = Field(default=20, ge=2, le=1000)
    sampler: str = "default"
    preset: Preset = Preset.standard
    seed: Seed = 0
    budget: int | None = Field(
        default=None, ge=2, le=1000,
        description="active learning: after the first `samples`, measure the architectures the predictor is "
                    "least sure of, up to this many in all",
    )
    target_uncertainty: float | None = Field(
        default=None, gt=0, le=10,
        description="stop active learning once the mean relative uncertainty (std / prediction) over the "
                    "space is at most this",
    )


class OnboardingRound(BaseModel):
    samples: int = Field(description="architectures measured so far (flagged measurements included)")
    uncertainty: float = Field(description="mean relative uncertainty (std / prediction) over the space")
    predictor_id: int
    remeasuring: list[str] = Field(default_factory=list,
                                   description="architectures measured once whose measurement the agent did "
                                               "not trust (unstable, drift) or whose sample this round's predictor "
                                               "found likelier mis-measured than not: each is measured twice more "
                                               "and the median of its trusted measurements kept")


class OnboardingOut(BaseModel):
    id: int
    device: str
    space: str
    sampler: str
    samples: int
    preset: str
    budget: int | None
    target_uncertainty: float | None
    rounds: list[OnboardingRound]
    status: OnboardingStatus
    jobs_total: int
    jobs_done: int
    jobs_failed: int
    predictor_id: int | None
    error: str | None
    created_at: Timestamp
    finished_at: Timestamp | None



class TaskOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: TaskKind
    status: TaskStatus
    space: str
    device: str | None
    onboarding_id: int | None
    params: dict[str, Any]
    progress: float
    attempts: int
    worker: str | None
    predictor_id: int | None
    error: str | None
    created_at: Timestamp
    not_before: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None

    @field_validator("space", "device", mode="before")
    @classmethod
    def _row_name(cls, value: Any) -> Any:
        """The space and device rows of the task, by name."""
        return getattr(value, "name", value)


class ExplainOut(BaseModel):
    device: str
    space: str
    predictor_id: int
    architectures: int = Field(description="architectures of the space the comparison was made on")
    resembles: list[Resemblance] = Field(description="reference devices, most alike first")
    op_costs: list[OpCost] = Field(description="operations, most costly on this device first")
