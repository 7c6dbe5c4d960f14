"""In-process entry points of the CLI: each opens the configured database for one operation."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from rich.progress import Progress, TaskID
from sqlalchemy.orm import Session, sessionmaker

from predictor.spaces import get_space
from server.db import make_engine, make_session_factory, session_scope, upgrade
from server.models import Predictor
from server.schemas import ExplainOut, PredictIn, PredictOut, SpaceOut
from server.services import collections, prediction, predictors, spaces
from server.services.answer_cache import PredictorCache
from server.services.artifacts import ArtifactStore
from server.services.catalog import get_device, resolve_space
from server.services.datasets import ImportReport, import_datasets, spaces_with_tables
from server.services.graph_references import row_source
from server.settings import Settings


def _sessions(settings: Settings) -> sessionmaker[Session]:
    torch.set_num_threads(settings.torch_threads)
    if settings.is_sqlite:
        upgrade(settings.database_url)
    return make_session_factory(make_engine(settings.database_url))


def import_reference_datasets(settings: Settings, root: Path, progress: Progress | None = None,
                              spaces: tuple[str, ...] | None = None) -> ImportReport:
    tasks: dict[str, TaskID] = {}

    def report(space: str, done: int, total: int) -> None:
        if progress is None:
            return
        if space not in tasks:
            tasks[space] = progress.add_task(f"import {space}", total=total)
        progress.update(tasks[space], completed=done)

    spaces_with_tables(spaces)  # a wrong name is refused before any database is created
    with session_scope(_sessions(settings)) as session:
        return import_datasets(session, root, spaces, progress=report)


def pretrain_base(settings: Settings, space: str, devices: list[str] | None, seed: int,
                  progress: Progress | None = None, archs_per_space: int | None = None) -> Predictor:
    task = progress.add_task(f"pre-train {space}", total=None) if progress is not None else None

    def report(step: int, total: int) -> None:
        if progress is not None and task is not None:
            progress.update(task, completed=step, total=total)

    resolved = resolve_space(space)
    return predictors.pretrain(_sessions(settings), resolved, devices, seed, report,
                               row_source(settings, resolved, devices, archs_per_space),
                               config=predictors.train_config(settings))


def describe_spaces(settings: Settings) -> list[SpaceOut]:
    with session_scope(_sessions(settings)) as session:
        return spaces.describe_all(session)


def explain_device(settings: Settings, device: str, space: str) -> ExplainOut:
    with session_scope(_sessions(settings)) as session:
        return prediction.explanation(session, PredictorCache(), get_device(session, device),
                                      resolve_space(space))


def predict_latencies(settings: Settings, device: str, space: str, architectures: list[str] | Literal["all"] | None,
                      collection: str | None = None) -> PredictOut:
    sessions = _sessions(settings)
    get_space("onnx").add_source(ArtifactStore(settings.artifact_dir).read)
    request = PredictIn(device=device, space=space, architectures=architectures, collection=collection)
    members = collections.members_named(sessions, collection) if collection is not None else None
    return prediction.predict_batch(sessions, PredictorCache(), prediction.PredictQuery.of(request, members))


def upload_models(settings: Settings, models: list[bytes]) -> list[str]:
    """Store ONNX models in the farm's artifact store as `onnx` architectures; their sha256s."""
    store = ArtifactStore(settings.artifact_dir)
    with session_scope(_sessions(settings)) as session:
        return [collections.upload(session, store, data).sha256 for data in models]
