"""Wire schemas between agents and the server.

The server imports these too, so both sides agree by construction. This module depends on
pydantic alone: the agent must install and run without the server's dependencies.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: version of the wire protocol and of the timing protocol; measurements record it, and only
#: measurements of the same version are reused instead of measuring again
PROTOCOL_VERSION = 2

#: failure classes worth another attempt: the model was never run. Every other class (load_error,
#: unsupported_op, out_of_memory, runtime_error, run_timeout, ...) is a property of the model on
#: the device and is stored as its result.
INFRASTRUCTURE_FAILURES = frozenset({"artifact_error", "lease_expired", "bad_lease", "runtime_unavailable"})


#: a JSON number, strictly: not `true`, not "12", and finite (Python's JSON parser takes NaN and
#: Infinity, which Postgres refuses to store and SQLite would keep as non-standard JSON)
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class Preset(str, Enum):
    quick = "quick"
    standard = "standard"
    rigorous = "rigorous"


class TimingProtocol(BaseModel):
    """How to time one artifact.

    Load and first inference are timed apart. Warm-up runs in windows of `warmup_window` runs,
    at least `warmup_runs` runs, until the median of a window is within `warmup_tolerance` of the
    previous window's (or `warmup_max_runs` is reached). Then at least `min_runs` runs and
    `min_seconds` seconds are timed, at most `max_runs`.
    """

    model_config = ConfigDict(extra="forbid")

    version: int = PROTOCOL_VERSION
    preset: Preset = Preset.standard
    warmup_runs: int = Field(10, ge=0, le=10_000)
    warmup_window: int = Field(5, ge=1, le=10_000)
    warmup_tolerance: float = Field(0.03, gt=0, le=1)
    warmup_max_runs: int = Field(200, ge=0, le=100_000)
    min_runs: int = Field(30, ge=1, le=100_000)
    min_seconds: float = Field(0.5, ge=0, le=3600)
    max_runs: int = Field(1000, ge=1, le=1_000_000)
    timeout_s: float = Field(300, gt=0, le=86_400)


PRESETS: dict[Preset, TimingProtocol] = {
    Preset.quick: TimingProtocol(
        preset=Preset.quick, warmup_runs=5, warmup_max_runs=50, min_runs=15, min_seconds=0.2, max_runs=5000
    ),
    Preset.standard: TimingProtocol(
        preset=Preset.standard, warmup_runs=10, min_runs=30, min_seconds=0.5, max_runs=20_000
    ),
    Preset.rigorous: TimingProtocol(
        preset=Preset.rigorous, warmup_runs=30, warmup_window=10, warmup_tolerance=0.02, warmup_max_runs=1000,
        min_runs=200, min_seconds=3.0, max_runs=10_000,
    ),
}


class DeviceSpec(BaseModel):
    """A device an agent serves, with the settings it measures under."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
    attributes: dict[str, str | int | Number | bool | None] = Field(default_factory=dict)


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
    """`agent_token` authenticates every later call and may be presented again to re-register
    (after a restart) as the same agent; the intervals are the server's to set."""

    agent_id: int
    agent_token: str
    poll_wait_s: float = Field(description="long-poll wait to ask for")
    heartbeat_s: float = Field(description="seconds between heartbeats of a running job")
    lease_ttl_s: float = Field(description="a lease not heartbeaten for this long is re-queued")


class Runtime(str, Enum):
    onnxruntime = "onnxruntime"
    pytorch = "pytorch"


class ArtifactFormat(str, Enum):
    onnx = "onnx"
    #: a `torch.export` program saved with `torch.export.save` (runtime pytorch)
    torch_export = "torch_export"


class ArtifactRef(BaseModel):
    sha256: str
    format: ArtifactFormat
    size_bytes: int
    url: str = Field(description="path of the download, relative to the server's base URL")


class JobLease(BaseModel):
    """A job leased to the agent; `lease_id` fences every later call about it."""

    job_id: int
    lease_id: str
    lease_expires_at: str
    device: str
    threads: int = Field(ge=1)
    runtime: Runtime = Runtime.onnxruntime
    #: ONNX Runtime execution provider to use (None: the CPU provider)
    provider: str | None = None
    artifact: ArtifactRef
    protocol: TimingProtocol


class ResultReply(BaseModel):
    """What an agent reads in the answer to its result (the rest of it describes the job)."""

    next_lease: JobLease | None = None


class HeartbeatRequest(BaseModel):
    lease_id: str


class HeartbeatResponse(BaseModel):
    lease_expires_at: str
    cancel_requested: bool


class LatencyStats(BaseModel):
    """Summary of the timed runs, in milliseconds."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(ge=1, strict=True)
    median_ms: Number = Field(gt=0)
    mean_ms: Number = Field(gt=0)
    min_ms: Number = Field(gt=0)
    max_ms: Number = Field(gt=0)
    p90_ms: Number = Field(gt=0)
    p99_ms: Number | None = Field(default=None, gt=0)
    iqr_ms: Number = Field(ge=0)
    cv: Number = Field(ge=0)


class ResultStatus(str, Enum):
    ok = "ok"
    failed = "failed"


class JobResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lease_id: str
    status: ResultStatus
    protocol_version: int = PROTOCOL_VERSION
    stats: LatencyStats | None = None
    samples_ms: list[Number] = Field(default_factory=list, max_length=1_000_000)
    load_ms: Number | None = Field(default=None, ge=0)
    first_inference_ms: Number | None = Field(default=None, ge=0)
    warmup_runs: int | None = Field(default=None, ge=0, description="warm-up runs done before timing")
    error: str | None = Field(default=None, max_length=10_000)
    failure_class: str | None = Field(default=None, max_length=64)
    provenance: dict[str, str | int | Number | bool | None | list[str]] = Field(default_factory=dict)

    @field_validator("samples_ms")
    @classmethod
    def _positive(cls, samples: list[float]) -> list[float]:
        if any(s <= 0 for s in samples):
            raise ValueError("samples must be positive")
        return samples

    @model_validator(mode="after")
    def _status_matches_payload(self) -> "JobResult":
        if self.status is ResultStatus.ok and self.stats is None:
            raise ValueError("an ok result needs stats")
        if self.status is ResultStatus.failed and not self.error:
            raise ValueError("a failed result needs an error message")
        return self
