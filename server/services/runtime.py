"""In-process entry points of the CLI: each opens the configured database for one operation."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from rich.progress import Progress

from server.db import make_engine, make_session_factory, session_scope, upgrade
from server.models import Predictor
from server.schemas import ExplainOut, PredictIn, PredictOut
from server.services import prediction, predictors
from server.services.answer_cache import PredictorCache
from server.services.catalog import get_device, resolve_space
from server.services.datasets import ImportReport, import_datasets
from server.settings import Settings


def _sessions(settings: Settings):  # type: ignore[no-untyped-def]
    torch.set_num_threads(settings.torch_threads)
    if settings.is_sqlite:
        upgrade(settings.database_url)
    return make_session_factory(make_engine(settings.database_url))


def import_reference_datasets(settings: Settings, root: Path, progress: Progress | None = None) -> ImportReport:
    tasks: dict[str, int] = {}

    def report(space: str, done: int, total: int) -> None:
        if progress is None:
            return
        if space not in tasks:
            tasks[space] = progress.add_task(f"import {space}", total=total)
        progress.update(tasks[space], completed=done)

    with session_scope(_sessions(settings)) as session:
        return import_datasets(session, root, progress=report)


def pretrain_base(settings: Settings, space: str, devices: list[str] | None, seed: int,
                  progress: Progress | None = None) -> Predictor:
    task = progress.add_task(f"pre-train {space}", total=None) if progress is not None else None

    def report(step: int, total: int) -> None:
        if progress is not None and task is not None:
            progress.update(task, completed=step, total=total)

    return predictors.pretrain(_sessions(settings), resolve_space(space), devices, seed, report)


def explain_device(settings: Settings, device: str, space: str) -> ExplainOut:
    with session_scope(_sessions(settings)) as session:
        return prediction.explanation(session, PredictorCache(), get_device(session, device),
                                      resolve_space(space))


def predict_latencies(settings: Settings, device: str, space: str, architectures: list[str] | Literal["all"]) -> PredictOut:
    query = prediction.PredictQuery.of(PredictIn(device=device, space=space, architectures=architectures))
    return prediction.predict_batch(_sessions(settings), PredictorCache(), query)
