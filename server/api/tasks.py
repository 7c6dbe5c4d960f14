"""Training tasks: pre-training and adaptation, run by the workers."""

from __future__ import annotations

from fastapi import APIRouter, Query
from sqlalchemy import select

from server.api.deps import Db
from server.api.pagination import Cursor, page
from server.auth import READ
from server.errors import NotFound
from server.models import TaskKind, TaskStatus, TrainingTask
from server.schemas import Page, RowId, TaskOut

router = APIRouter(prefix="/api/v1/tasks", tags=["predictors"])


@router.get("", dependencies=[READ])
def list_tasks(session: Db, status: TaskStatus | None = None, kind: TaskKind | None = None,
               cursor: Cursor = 0, limit: int = Query(100, ge=1, le=1000)) -> Page[TaskOut]:
    """The newest tasks first."""
    query = select(TrainingTask)
    if status is not None:
        query = query.where(TrainingTask.status == status)
    if kind is not None:
        query = query.where(TrainingTask.kind == kind)
    return page(session, query, TrainingTask.id, cursor, limit, TaskOut.model_validate, newest_first=True)


@router.get("/{task_id}", dependencies=[READ])
def read_task(task_id: RowId, session: Db) -> TaskOut:
    task = session.get(TrainingTask, task_id)
    if task is None:
        raise NotFound(f"no training task {task_id}", "task_id")
    return TaskOut.model_validate(task)
