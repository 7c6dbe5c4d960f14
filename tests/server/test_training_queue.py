"""The training queue on a real database of its own (no server's worker may claim its tasks):
one claim per task, a stalled worker's task is claimed again, re-adaptations of a device fold
into one pending task."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from predictor.spaces import get_space
from server.cli.local import temporary_postgres_database
from server.db import make_engine, make_session_factory, session_scope, upgrade
from server.models import Device, TaskStatus, TrainingTask, as_utc, utcnow
from server.services import training_queue
from server.services.catalog import space_row
from tests.helpers import POSTGRES_ADMIN_URL


@pytest.fixture(params=["sqlite", "postgres"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'queue.db'}"
        upgrade(url)
        yield make_session_factory(make_engine(url))
        return
    with temporary_postgres_database(POSTGRES_ADMIN_URL, "latfarm_queue") as url:
        engine = make_engine(url)
        yield make_session_factory(engine)
        engine.dispose()


def test_a_task_is_claimed_once_and_again_after_its_worker_stalls(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as session:
        task_id = training_queue.enqueue_pretrain(session, space_row(session, get_space("nb201")).id, None, 0).id
    with session_scope(sessions) as session:
        first = training_queue.claim(session, "worker-a", lease_s=0.2)
        assert first is not None and first.id == task_id and first.attempts == 1
    with session_scope(sessions) as session:
        assert training_queue.claim(session, "worker-b", lease_s=60) is None  # leased to a
    time.sleep(0.3)
    with session_scope(sessions) as session:
        second = training_queue.claim(session, "worker-b", lease_s=60)
        assert second is not None and second.id == task_id and second.attempts == 2
    with session_scope(sessions) as session:
        assert not training_queue.renew(session, task_id, "worker-a", 60, 0.5)  # a lost it
        assert training_queue.renew(session, task_id, "worker-b", 60, 0.5)
        training_queue.finish(session.get_one(TrainingTask, task_id), predictor_id=None)
    with session_scope(sessions) as session:
        done = session.get_one(TrainingTask, task_id)
        assert done.status is TaskStatus.done and done.progress == 1.0 and done.lease_expires_at is None


def test_readaptations_of_a_device_fold_into_one_pending_task(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as session:
        device = Device(name=f"readapt-{time.time_ns()}")
        session.add(device)
        session.flush()
        space_id = space_row(session, get_space("nb201")).id
        for _ in range(3):
            training_queue.schedule_readaptation(session, space_id, device.id, delay_s=60)
        pending = session.scalar(select(func.count()).where(TrainingTask.device_id == device.id))
        assert pending == 1
        task = session.scalars(select(TrainingTask).where(TrainingTask.device_id == device.id)).one()
        assert task.status is TaskStatus.queued and task.onboarding_id is None
        assert as_utc(task.not_before) > utcnow() + timedelta(seconds=50)  # not due before the delay
