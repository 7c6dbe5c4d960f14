"""The long-lived objects a request handler needs, built once per application."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from server.auth import TokenCache
from server.background.wakeup import JobWakeup
from server.ratelimit import PollSlots, RateLimiter
from server.services.answer_cache import PredictorCache
from server.services.artifacts import ArtifactStore
from server.services.leasing import Leases
from server.settings import Settings


@dataclass
class Services:
    settings: Settings
    sessions: sessionmaker[Session]
    store: ArtifactStore
    leases: Leases
    predictors: PredictorCache
    admin_token: str
    tokens: TokenCache
    wakeup: JobWakeup
    predict_limiter: RateLimiter
    polls: PollSlots
