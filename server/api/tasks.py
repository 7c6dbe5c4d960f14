"""Training tasks: pre-training and adaptation, run by the workers."""

from __future__ import annotations

from fastapi import APIRouter, Query
from sqlalchemy import select

from server.api.deps import Db
from server.auth import READ
from server.errors import NotFound
from server.models import TaskKind, TaskStatus, TrainingTask
from server.schemas import RowId, TaskOut

router = APIRouter(prefix="/api/v1/tasks", tags=["predictors"])


@router.get("", dependencies=[READ])
def list_tasks(session: Db, status: TaskStatus | None = None, kind: TaskKind | None = None,
               limit: int = Query(100, ge=1, le=1000)) -> list[TaskOut]:
    """The newest tasks first."""
    query = select(TrainingTask).order_by(TrainingTask.id.desc()).limit(limit)
    if status is not None:
        query = query.where(TrainingTask.status == status)
    if kind is not None:
        query = query.where(TrainingTask.kind == kind)
    return [TaskOut.model_validate(task) for task in session.scalars(query)]


@router.get("/{task_id}", dependencies=[READ])
def read_task(task_id: RowId, session: Db) -> TaskOut:
    task = session.get(TrainingTask, task_id)
    if task is None:
        raise NotFound(f"no training task {task_id}", "task_id")
    return TaskOut.model_validate(task)
