"""The farm's answers as FarmClient returns them.

These mirror the server's response schemas without importing the server (which needs torch):
tests compare each model with the server's OpenAPI document, so the two cannot drift apart.
Fields the server adds later are ignored, so an older client keeps working."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

DeviceState = Literal["online", "busy", "paused", "degraded", "offline", "retired"]
JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]
JobKind = Literal["measure", "canary"]
Preset = Literal["quick", "standard", "rigorous"]
PredictorKind = Literal["base", "adapted"]
PredictorStatus = Literal["ready", "stale"]
OnboardingStatus = Literal["measuring", "adapting", "ready", "failed"]
TaskKind = Literal["pretrain", "adapt"]
TaskStatus = Literal["queued", "running", "done", "failed"]

FINISHED_JOB: frozenset[JobStatus] = frozenset({"done", "failed", "cancelled"})
FINISHED_ONBOARDING: frozenset[OnboardingStatus] = frozenset({"ready", "failed"})
FINISHED_TASK: frozenset[TaskStatus] = frozenset({"done", "failed"})


class Answer(BaseModel):
    model_config = ConfigDict(frozen=True)


Item = TypeVar("Item", bound=Answer)


class Page(Answer, Generic[Item]):
    """One page of a list: pass `next_cursor` as `cursor` for the next; None on the last."""

    items: list[Item]
    next_cursor: int | None


class Device(Answer):
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
    #: ids of the agents serving the device; empty when no agent measures on it
    agents: list[int]
    last_seen: datetime | None
    canary_baseline_ms: float | None
    canary_last_ms: float | None


class Artifact(Answer):
    sha256: str
    format: str
    size_bytes: int
    architecture_id: int | None


class Job(Answer):
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
    queue_position: int | None
    attempts: int
    error: str | None
    failure_class: str | None
    measurement_id: int | None
    #: the measurement is an earlier valid one of the same model, device and preset
    reused: bool
    #: the median of the measured runs, once done
    latency_ms: float | None
    flags: list[str] | None
    #: the measurement is trained on and reused (no flag puts its median in doubt)
    valid: bool | None = None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_JOB


class Prediction(Answer):
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

    def by_architecture(self) -> dict[str, tuple[float, float]]:
        """architecture key -> (latency, uncertainty), in ms."""
        return {key: (ms, std) for key, ms, std in zip(self.architectures, self.latency_ms, self.uncertainty_ms)}


class Space(Answer):
    """An installed search space: latfarm's own or one an installed package registers."""

    name: str
    description: str
    #: None where the space is unbounded (space onnx: whatever models were uploaded)
    size: int | None
    key_format: str
    example_key: str | None
    has_reference_tables: bool
    builds_networks: bool
    #: encoded from its ONNX graphs: its base predictor pre-trains on the reference spaces' exports
    graph_encoded: bool
    reference_devices: list[str]
    base_predictor_id: int | None


class Predictor(Answer):
    id: int
    space: str
    kind: PredictorKind
    version: int
    parent_id: int | None
    device: str | None
    status: PredictorStatus
    training_devices: list[str]
    #: training figures; adapted predictors add `validation` and `curve`
    metrics: dict[str, Any]
    data_snapshot: dict[str, Any]
    created_at: datetime


class OnboardingRound(Answer):
    samples: int
    uncertainty: float
    predictor_id: int
    remeasuring: list[str] = []


class Onboarding(Answer):
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
    #: the predictor that serves the device, once ready
    predictor_id: int | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class Task(Answer):
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
    created_at: datetime
    not_before: datetime
    started_at: datetime | None
    finished_at: datetime | None


class Resemblance(Answer):
    device: str
    spearman: float
    weight: float


class OpCost(Answer):
    op: str
    effect_pct: float
    reference_effect_pct: float


class Explanation(Answer):
    device: str
    space: str
    predictor_id: int
    architectures: int
    resembles: list[Resemblance]
    op_costs: list[OpCost]
