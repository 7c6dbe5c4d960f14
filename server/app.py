"""FastAPI application factory."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from anyio import to_thread
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from predictor.spaces import get_space
from server import __version__
from server.api import (
    agents,
    architectures,
    artifacts,
    collections,
    devices,
    jobs,
    measurements,
    onboardings,
    predict,
    predictors,
    spaces,
    system,
    tasks,
    tokens,
)
from server.auth import AuthenticateFirst, TokenCache
from server.background.reaper import Reaper
from server.background.training_worker import TrainingWorker
from server.background.wakeup import JobWakeup
from server.context import Services
from server.db import make_engine, make_session_factory, normalise_url
from server.errors import BodySizeLimit, install_error_handlers
from server.logs import RequestId, configure_worker_logging
from server.ratelimit import PollSlots, RateLimiter
from server.services import onboarding
from server.services.answer_cache import PredictorCache
from server.services.artifacts import ArtifactStore
from server.services.leasing import Leases
from server.settings import Settings, get_settings
from server.ui import router as ui_router

log = logging.getLogger(__name__)
ROUTERS = tuple(module.router for module in (system, devices, architectures, artifacts, measurements, jobs, agents,
                                             tokens, predictors, tasks, onboardings, predict, collections, spaces))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_worker_logging(settings.log_format, settings.log_level)
    torch.set_num_threads(settings.torch_threads)
    admin_token = settings.admin_token or secrets.token_urlsafe(24)
    if settings.admin_token is None:
        log.warning("LATFARM_ADMIN_TOKEN is not set; this run's admin token is %s", admin_token)
    sessions = make_session_factory(make_engine(settings.database_url))
    url = normalise_url(settings.database_url)
    store = ArtifactStore(settings.artifact_dir)
    # uploaded models are encoded from their stored bytes on first use
    get_space("onnx").add_source(store.read)
    services = Services(
        settings=settings,
        sessions=sessions,
        store=store,
        leases=Leases(store, settings),
        predictors=PredictorCache(torch_threads=settings.torch_threads),
        admin_token=admin_token,
        tokens=TokenCache(),
        wakeup=JobWakeup(sessions, url.replace("+psycopg", "") if url.startswith("postgresql") else None),
        predict_limiter=RateLimiter(settings.predict_rate_limit),
        polls=PollSlots(settings.max_polls_per_agent, min(settings.max_polls, settings.max_concurrency)),
    )

    def finish_onboardings(ids: set[int]) -> None:
        for onboarding_id in ids:
            onboarding.finish_if_measured(sessions, onboarding_id)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # FastAPI validates a sync endpoint's response on a worker thread *before* the request's
        # session commits; with fewer threads than requests, requests waiting on that session's
        # row locks can hold every thread and the commit never comes (seen at 100 registrations)
        to_thread.current_default_thread_limiter().total_tokens = settings.max_concurrency
        services.wakeup.start()
        reaper = Reaper(sessions, settings, finish_onboardings)
        reaper.start()
        worker = TrainingWorker(sessions, services.predictors, settings) if settings.worker else None
        if worker is not None:
            worker.start()
        try:
            yield
        finally:
            if worker is not None:
                worker.stop()
            reaper.stop()
            services.wakeup.stop()

    # /docs and /redoc load Swagger UI's and ReDoc's scripts from this server, not from a CDN: they
    # work on a lab network without internet
    app = FastAPIOffline(
        title="latfarm",
        version=__version__,
        summary="Latency measurement farm and few-shot latency predictor for hardware-aware NAS",
        lifespan=lifespan,
    )
    app.state.services = services
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AuthenticateFirst)  # added later, so it runs before the body limit reads anything
    app.add_middleware(RequestId)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(ui_router)
    return app
