"""The queue of training work in the database: pre-training and adaptation tasks, claimed by
workers under a renewable lease so that several server processes can share one database and a
worker that dies loses nothing."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from server.db import insert_missing
from server.models import TaskKind, TaskStatus, TrainingTask, utcnow

#: a task whose worker died mid-way is tried this many times in all
MAX_ATTEMPTS = 3


def enqueue_pretrain(session: Session, space_id: int, devices: list[str] | None, seed: int,
                     archs_per_space: int | None = None) -> TrainingTask:
    params = {"devices": devices, "seed": seed, "archs_per_space": archs_per_space}
    task = TrainingTask(kind=TaskKind.pretrain, space_id=space_id, params=params)
    session.add(task)
    session.flush()
    return task


def enqueue_adaptation(session: Session, space_id: int, device_id: int, onboarding_id: int) -> TrainingTask:
    task = TrainingTask(kind=TaskKind.adapt, space_id=space_id, device_id=device_id, onboarding_id=onboarding_id)
    session.add(task)
    session.flush()
    return task


def schedule_readaptation(session: Session, space_id: int, device_id: int, delay_s: float) -> None:
    """Re-adapt the device's predictor in `delay_s`; measurements arriving meanwhile join the same
    task (one pending re-adaptation per device and space, by a partial unique index)."""
    now = utcnow()
    insert_missing(session, TrainingTask, [{
        "kind": TaskKind.adapt.name, "status": TaskStatus.queued.name, "space_id": space_id, "device_id": device_id,
        "params": {}, "not_before": now + timedelta(seconds=delay_s), "attempts": 0, "progress": 0.0,
        "created_at": now,
    }])


def claim(session: Session, worker: str, lease_s: float) -> TrainingTask | None:
    """The oldest due task, or a running one whose lease ran out, leased to `worker`."""
    now = utcnow()
    candidate = session.scalar(
        select(TrainingTask.id)
        .where(or_((TrainingTask.status == TaskStatus.queued) & (TrainingTask.not_before <= now),
                   (TrainingTask.status == TaskStatus.running) & (TrainingTask.lease_expires_at < now)))
        .order_by(TrainingTask.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    if candidate is None:
        return None
    claimed = session.execute(
        update(TrainingTask)
        .where(TrainingTask.id == candidate,
               or_(TrainingTask.status == TaskStatus.queued, TrainingTask.lease_expires_at < now))
        .values(status=TaskStatus.running, worker=worker, lease_expires_at=now + timedelta(seconds=lease_s),
                attempts=TrainingTask.attempts + 1, started_at=now, progress=0.0)
    ).rowcount
    if claimed != 1:  # another worker got there first (SQLite has no row locks to skip)
        return None
    return session.get_one(TrainingTask, candidate, populate_existing=True)


def renew(session: Session, task_id: int, worker: str, lease_s: float, progress: float) -> bool:
    """Extend the lease and record progress; False if the task is no longer this worker's."""
    return session.execute(
        update(TrainingTask)
        .where(TrainingTask.id == task_id, TrainingTask.worker == worker, TrainingTask.status == TaskStatus.running)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s), progress=progress)
    ).rowcount == 1


def finish(task: TrainingTask, predictor_id: int | None = None, error: str | None = None) -> None:
    task.status = TaskStatus.failed if error is not None else TaskStatus.done
    task.predictor_id, task.error, task.finished_at = predictor_id, error, utcnow()
    task.lease_expires_at = None
    if error is None:
        task.progress = 1.0
