"""FastAPI application factory."""

from __future__ import annotations

import logging
import secrets

import torch
from fastapi import FastAPI

from server import __version__
from server.api import (
    agents,
    architectures,
    artifacts,
    devices,
    jobs,
    measurements,
    onboardings,
    predict,
    predictors,
    system,
)
from server.context import Services
from server.db import make_engine, make_session_factory
from server.errors import BodySizeLimit, install_error_handlers
from server.services.artifacts import ArtifactStore
from server.services.predictors import PredictorCache
from server.settings import Settings, get_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    torch.set_num_threads(settings.torch_threads)
    admin_token = settings.admin_token or secrets.token_urlsafe(24)
    if settings.admin_token is None:
        log.warning("LATFARM_ADMIN_TOKEN is not set; this run's admin token is %s", admin_token)
    app = FastAPI(
        title="latfarm",
        version=__version__,
        summary="Latency measurement farm and few-shot latency predictor for hardware-aware NAS",
    )
    app.state.services = Services(
        settings=settings,
        sessions=make_session_factory(make_engine(settings.database_url)),
        store=ArtifactStore(settings.artifact_dir),
        predictors=PredictorCache(),
        admin_token=admin_token,
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    install_error_handlers(app)
    for module in (system, devices, architectures, artifacts, measurements, jobs, agents, predictors, onboardings, predict):
        app.include_router(module.router)
    return app
