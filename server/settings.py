"""Server configuration from `LATFARM_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import limits
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from predictor.datasets import find_datasets


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LATFARM_", extra="ignore")

    database_url: str = "sqlite:///./latfarm.db"
    datasets: Path = Field(default_factory=find_datasets)
    artifact_dir: Path = Path(".latfarm/artifacts")
    admin_token: str | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    #: requests one server process serves at once (more get 503); as many worker threads are
    #: allowed, so a request holding a transaction always finds a thread to finish in
    max_concurrency: int = Field(default=1000, ge=1)
    #: worker threads serving agents' polls and results at once, per server process; each holds a
    #: database connection, and more only take turns at the GIL (at 100 agents on 2 cores: 4 threads
    #: dispatched 164-172 jobs/s, one per request 129)
    agent_threads: int = Field(default=4, ge=1)
    #: long polls one agent may hold open at once (it needs one; more get 429 with Retry-After)
    max_polls_per_agent: int = Field(default=4, ge=1)
    #: long polls one server process holds open at once, all agents together; kept below
    #: `max_concurrency` so that other requests (health checks, admins) always find a slot
    max_polls: int = Field(default=800, ge=1)
    #: calls to /predict one token may make per server process, e.g. "1000/second" ("": no limit)
    predict_rate_limit: str = "1000/second"
    # intervals handed to agents at registration
    poll_wait_s: float = Field(default=20.0, gt=0)
    heartbeat_s: float = Field(default=10.0, gt=0)
    lease_ttl_s: float = Field(default=60.0, gt=0)
    #: seconds between the reaper's passes (expired leases, deadlines, offline devices)
    reaper_interval_s: float = Field(default=2.0, gt=0)
    #: tries per job when the failure is the infrastructure's (lost agent, artifact download)
    max_attempts: int = Field(default=3, ge=1)
    #: default run timeout of a job, from its start; the agent is told to stop at this point too
    run_timeout_s: float = Field(default=600.0, gt=0)
    #: a device none of whose agents was seen for this long is marked offline
    offline_after_s: float = Field(default=120.0, gt=0)
    #: measure the canary architecture every K jobs of a device (0: only at registration)
    canary_every: int = Field(default=50, ge=0)
    #: relative change of the canary's median from its baseline that marks a device degraded
    canary_drift: float = Field(default=0.10, gt=0)
    #: a degraded device gets a re-check canary this often until one passes
    canary_recheck_s: float = Field(default=300.0, gt=0)
    #: also train predictors on measurements whose flags put their median in doubt (unstable, drift)
    train_on_flagged: bool = False
    #: reference devices held out in turn at pre-training to choose the default sampler, each
    #: costing one more fit of the ensemble; 0 leaves the default sampler unvalidated
    pretrain_sampler_folds: int = Field(default=0, ge=0)
    #: torch threads for training and prediction; with more than one, a busy 2-core host (an agent
    #: measuring beside the server) slowed pre-training 24-fold, while one thread lost nothing
    torch_threads: int = Field(default=1, ge=1)
    #: "json": one JSON object per log line, for log collectors; "text": one readable line; both carry
    #: the request id
    log_format: Literal["text", "json"] = "text"
    #: the least severe level logged (uvicorn's access lines are INFO)
    log_level: str = "INFO"
    #: run a training worker (pre-training, adaptation) in each server process; switch it off when
    #: separate `latfarm worker` processes share the database
    worker: bool = True
    #: seconds an idle worker waits before looking for training tasks again
    worker_poll_s: float = Field(default=1.0, gt=0)
    #: a training task whose worker stops renewing its lease for this long is claimed again
    task_lease_s: float = Field(default=120.0, gt=0)
    #: a device's predictor is re-adapted this long after a new valid measurement of it; those
    #: arriving meanwhile join the same re-adaptation
    readapt_delay_s: float = Field(default=30.0, ge=0)

    @field_validator("predict_rate_limit")
    @classmethod
    def _rate_limit_parses(cls, value: str) -> str:
        if value:
            limits.parse(value)  # ValueError, shown as a settings error, for "100 per sec"
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
