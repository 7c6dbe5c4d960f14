"""Agent settings: from CLI flags, else `LATFARM_AGENT_*` environment variables, else defaults."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from agent.protocol import Runtime

ENV_PREFIX = "LATFARM_AGENT_"
DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")  # as DeviceSpec.name
DEFAULT_CACHE_DIR = "~/.cache/latfarm/artifacts"
DEFAULT_STATE_DIR = "~/.local/state/latfarm-agent"
MB = 1 << 20
DEFAULT_CACHE_MAX_MB = 2048

# setting name -> environment variable
ENV_VARS: dict[str, str] = {
    "server": ENV_PREFIX + "SERVER",
    "token": ENV_PREFIX + "TOKEN",
    "devices": ENV_PREFIX + "DEVICES",
    "threads": ENV_PREFIX + "THREADS",
    "runtime": ENV_PREFIX + "RUNTIME",
    "provider": ENV_PREFIX + "PROVIDER",
    "cache_dir": ENV_PREFIX + "CACHE_DIR",
    "cache_max_bytes": ENV_PREFIX + "CACHE_MAX_MB",
    "state_dir": ENV_PREFIX + "STATE_DIR",
    "name": ENV_PREFIX + "NAME",
}


def mb_to_bytes(value: float | str) -> int | str:
    """Megabytes (as given on the command line or in the environment) to bytes; text that is not
    a number is returned as is, for validation to reject with the setting's name."""
    try:
        return int(float(value) * MB)
    except (ValueError, OverflowError):
        return str(value)


def _hostname() -> str:
    return socket.gethostname() or "agent"


class AgentSettings(BaseModel):
    """Everything the agent needs to run.

    `token` is the registration token; the agent token returned by registration lives in the
    client and in `state_dir` (see `agent.state`), never here. `provider` is an ONNX Runtime
    execution provider (None: the CPU provider). `poll_wait_s` None means "use the wait the
    server suggests".
    """

    model_config = ConfigDict(extra="forbid")

    server: str = Field(min_length=1)
    token: str = Field(min_length=1)
    devices: list[str] = Field(default_factory=list)
    threads: int = Field(1, ge=1, le=1024)
    runtime: Runtime = Runtime.onnxruntime
    provider: str | None = Field(None, min_length=1, max_length=128)
    cache_dir: Path = Field(default_factory=lambda: Path(DEFAULT_CACHE_DIR).expanduser())
    cache_max_bytes: int = Field(DEFAULT_CACHE_MAX_MB * MB, ge=0)
    state_dir: Path = Field(default_factory=lambda: Path(DEFAULT_STATE_DIR).expanduser())
    name: str = Field(default_factory=_hostname, min_length=1, max_length=128)
    max_jobs: int | None = Field(None, ge=1)
    exit_when_idle: bool = False
    poll_wait_s: float | None = Field(None, ge=0, le=3600)

    @field_validator("server")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError("server must be an http:// or https:// URL")
        return value

    @field_validator("devices", mode="before")
    @classmethod
    def _split_devices(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, (list, tuple)):
            return [str(v).strip() for v in value if str(v).strip()]
        return value

    @field_validator("devices", mode="after")
    @classmethod
    def _valid_device_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if len(name) > 128 or not DEVICE_NAME.match(name):
                raise ValueError(f"invalid device name {name!r} (letters, digits, '.', '_', '/', '-')")
        return list(dict.fromkeys(value))

    @field_validator("cache_dir", "state_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("provider", mode="after")
    @classmethod
    def _provider_needs_onnxruntime(cls, value: str | None, info: ValidationInfo) -> str | None:
        runtime = info.data.get("runtime")  # absent when the runtime itself is invalid
        if value is not None and runtime is not None and runtime is not Runtime.onnxruntime:
            raise ValueError(f"an execution provider applies to runtime onnxruntime only, not {runtime.value}")
        return value

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None,
             environ: Mapping[str, str] | None = None) -> AgentSettings:
        """Merge `overrides` (e.g. CLI flags; None values are ignored) over the environment.

        Raises pydantic.ValidationError when a required value is missing or invalid.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field, var in ENV_VARS.items():
            raw = env.get(var)
            if raw is not None and raw.strip() != "":
                values[field] = mb_to_bytes(raw.strip()) if field == "cache_max_bytes" else raw.strip()
        for field, value in (overrides or {}).items():
            if value is not None:
                values[field] = value
        return cls.model_validate(values)
