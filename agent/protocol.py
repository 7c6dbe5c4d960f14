"""Wire schemas between agents and the server.

The server imports these too, so both sides agree by construction. This module depends on
pydantic alone: the agent must install and run without the server's dependencies.
"""

from __future__ import annotations

import math
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PROTOCOL_VERSION = 1


class Preset(str, Enum):
    quick = "quick"
    standard = "standard"
    rigorous = "rigorous"


class TimingProtocol(BaseModel):
    """How to time one artifact: warm-up, then at least `min_runs` runs and `min_seconds`."""

    model_config = ConfigDict(extra="forbid")

    preset: Preset = Preset.standard
    warmup_runs: int = Field(10, ge=0, le=10_000)
    min_runs: int = Field(30, ge=1, le=100_000)
    min_seconds: float = Field(0.5, ge=0, le=3600)
    max_runs: int = Field(1000, ge=1, le=1_000_000)
    timeout_s: float = Field(300, gt=0, le=86_400)


PRESETS: dict[Preset, TimingProtocol] = {
    Preset.quick: TimingProtocol(preset=Preset.quick, warmup_runs=5, min_runs=15, min_seconds=0.2, max_runs=200),
    Preset.standard: TimingProtocol(preset=Preset.standard, warmup_runs=10, min_runs=30, min_seconds=0.5),
    Preset.rigorous: TimingProtocol(
        preset=Preset.rigorous, warmup_runs=30, min_runs=200, min_seconds=3.0, max_runs=10_000
    ),
}


class DeviceSpec(BaseModel):
    """A device an agent serves, with the settings it measures under."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
    attributes: dict[str, str | int | float | bool | None] = Field(default_factory=dict)


class Capabilities(BaseModel):
    """What the agent's host is and can run."""

    hostname: str
    cpu_model: str
    cpu_cores: int
    memory_bytes: int
    os: str
    python: str
    agent_version: str
    protocol_version: int = PROTOCOL_VERSION
    runtimes: dict[str, str] = Field(default_factory=dict, description="runtime -> version")
    onnxruntime_providers: list[str] = Field(default_factory=list)


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    devices: list[DeviceSpec] = Field(min_length=1, max_length=64)
    capabilities: Capabilities


class RegisterResponse(BaseModel):
    agent_id: int
    agent_token: str
    poll_wait_s: float
    heartbeat_s: float
    lease_ttl_s: float


class ArtifactRef(BaseModel):
    sha256: str
    format: str
    size_bytes: int
    url: str = Field(description="path of the download, relative to the server's base URL")


class JobLease(BaseModel):
    """A job leased to the agent; `lease_id` fences every later call about it."""

    job_id: int
    lease_id: str
    lease_expires_at: str
    device: str
    threads: int = Field(ge=1)
    artifact: ArtifactRef
    protocol: TimingProtocol


class HeartbeatRequest(BaseModel):
    lease_id: str


class HeartbeatResponse(BaseModel):
    lease_expires_at: str
    cancel_requested: bool


class LatencyStats(BaseModel):
    """Summary of the timed runs, in milliseconds."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(ge=1)
    median_ms: float = Field(gt=0)
    mean_ms: float = Field(gt=0)
    min_ms: float = Field(gt=0)
    max_ms: float = Field(gt=0)
    p90_ms: float = Field(gt=0)
    p99_ms: float | None = Field(default=None, gt=0)
    iqr_ms: float = Field(ge=0)
    cv: float = Field(ge=0)

    @field_validator("*")
    @classmethod
    def _finite(cls, value: float | int | None) -> float | int | None:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class ResultStatus(str, Enum):
    ok = "ok"
    failed = "failed"


class JobResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lease_id: str
    status: ResultStatus
    stats: LatencyStats | None = None
    samples_ms: list[float] = Field(default_factory=list, max_length=1_000_000)
    load_ms: float | None = Field(default=None, ge=0)
    first_inference_ms: float | None = Field(default=None, ge=0)
    error: str | None = Field(default=None, max_length=10_000)
    failure_class: str | None = Field(default=None, max_length=64)
    provenance: dict[str, str | int | float | bool | None | list[str]] = Field(default_factory=dict)

    @field_validator("samples_ms")
    @classmethod
    def _positive_finite(cls, samples: list[float]) -> list[float]:
        if any(not math.isfinite(s) or s <= 0 for s in samples):
            raise ValueError("samples must be finite and positive")
        return samples

    @model_validator(mode="after")
    def _status_matches_payload(self) -> "JobResult":
        if self.status is ResultStatus.ok and self.stats is None:
            raise ValueError("an ok result needs stats")
        if self.status is ResultStatus.failed and not self.error:
            raise ValueError("a failed result needs an error message")
        return self
