"""Agent settings: from CLI flags, else `LATFARM_AGENT_*` environment variables, else defaults."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

ENV_PREFIX = "LATFARM_AGENT_"
DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")  # as DeviceSpec.name
DEFAULT_CACHE_DIR = "~/.cache/latfarm/artifacts"

# setting name -> environment variable
ENV_VARS: dict[str, str] = {
    "server": ENV_PREFIX + "SERVER",
    "token": ENV_PREFIX + "TOKEN",
    "devices": ENV_PREFIX + "DEVICES",
    "threads": ENV_PREFIX + "THREADS",
    "cache_dir": ENV_PREFIX + "CACHE_DIR",
    "name": ENV_PREFIX + "NAME",
}


def _hostname() -> str:
    return socket.gethostname() or "agent"


class AgentSettings(BaseModel):
    """Everything the agent needs to run.

    `token` is the registration token; the agent token returned by registration is kept by the
    client, never here. `poll_wait_s` None means "use the wait the server suggests".
    """

    model_config = ConfigDict(extra="forbid")

    server: str = Field(min_length=1)
    token: str = Field(min_length=1)
    devices: list[str] = Field(default_factory=list)
    threads: int = Field(1, ge=1, le=1024)
    cache_dir: Path = Field(default_factory=lambda: Path(DEFAULT_CACHE_DIR).expanduser())
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

    @field_validator("cache_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> AgentSettings:
        """Merge `overrides` (e.g. CLI flags; None values are ignored) over the environment.

        Raises pydantic.ValidationError when a required value is missing or invalid.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field, var in ENV_VARS.items():
            raw = env.get(var)
            if raw is not None and raw.strip() != "":
                values[field] = raw.strip()
        for field, value in (overrides or {}).items():
            if value is not None:
                values[field] = value
        return cls.model_validate(values)
