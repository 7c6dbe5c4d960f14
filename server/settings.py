"""Server configuration from `LATFARM_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from predictor.datasets import find_datasets


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LATFARM_", extra="ignore")

    database_url: str = "sqlite:///./latfarm.db"
    datasets: Path | None = Field(default_factory=find_datasets)
    artifact_dir: Path = Path(".latfarm/artifacts")
    admin_token: str | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    poll_wait_s: float = 20.0
    heartbeat_s: float = 10.0
    lease_ttl_s: float = 120.0
    #: torch threads for training and prediction; with more than one, a busy 2-core host (an agent
    #: measuring beside the server) slowed pre-training 24-fold, while one thread lost nothing
    torch_threads: int = Field(default=1, ge=1)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
