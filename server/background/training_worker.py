"""The training worker: claims pre-training and adaptation tasks from the database and runs them
one at a time on a thread of its own, so requests never wait for training."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from predictor.spaces import get_space
from server.db import session_scope
from server.models import TaskKind, TrainingTask
from server.services import adaptation, onboarding, predictors, training_queue
from server.services.answer_cache import PredictorCache
from server.services.artifacts import ArtifactStore
from server.services.graph_references import row_source
from server.settings import Settings

log = logging.getLogger(__name__)
#: seconds between lease renewals while a task reports progress
RENEW_EVERY_S = 5.0


class LeaseLost(RuntimeError):
    """The task was claimed again by another worker (this one stalled past its lease)."""


class TrainingWorker:
    def __init__(self, sessions: sessionmaker[Session], cache: PredictorCache, settings: Settings) -> None:
        self.sessions, self.cache, self.settings = sessions, cache, settings
        # adaptations in space onnx encode the uploaded models they fit on from the artifact store
        get_space("onnx").add_source(ArtifactStore(settings.artifact_dir).read)
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run_forever, name="training-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the task in hand; a long one is not waited for (the thread is a daemon, and
        the task is claimed again once its lease runs out)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def run_forever(self) -> None:
        self.cache.pin_torch_threads()
        log.info("training worker %s started", self.name)
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception:  # a database outage must not end the worker
                log.exception("training worker %s: claiming a task failed", self.name)
                worked = False
            if not worked:
                self._stop.wait(self.settings.worker_poll_s)

    def run_once(self) -> bool:
        """Run the next due task, if any; True if there was one."""
        with session_scope(self.sessions) as session:
            task = training_queue.claim(session, self.name, self.settings.task_lease_s)
            if task is None:
                return False
            task_id, kind, attempts = task.id, task.kind, task.attempts
        if attempts > training_queue.MAX_ATTEMPTS:
            self._fail(task_id, f"gave up after {training_queue.MAX_ATTEMPTS} attempts: "
                                "its worker stopped renewing the lease each time")
            return True
        started = time.perf_counter()
        try:
            if kind is TaskKind.pretrain:
                self._pretrain(task_id)
            else:
                self._adapt(task_id)
        except LeaseLost:
            log.warning("training task %s was claimed again by another worker; dropped here", task_id)
        except Exception as exc:  # recorded on the task (and its onboarding); the worker goes on
            log.exception("training task %s failed", task_id)
            self._fail(task_id, str(exc) or type(exc).__name__)
        else:
            log.info("training task %s (%s) done in %.1f s", task_id, kind.value, time.perf_counter() - started)
        return True

    def _pretrain(self, task_id: int) -> None:
        with session_scope(self.sessions) as session:
            task = session.get_one(TrainingTask, task_id)
            space, devices, seed = get_space(task.space.name), task.params.get("devices"), task.params.get("seed", 0)
            source = row_source(self.settings, space, devices, task.params.get("archs_per_space"))
        row = predictors.pretrain(self.sessions, space, devices, seed, self._reporter(task_id), source,
                                  config=predictors.train_config(self.settings))
        with session_scope(self.sessions) as session:
            training_queue.finish(session.get_one(TrainingTask, task_id), predictor_id=row.id)

    def _adapt(self, task_id: int) -> None:
        with session_scope(self.sessions) as session:
            task = session.get_one(TrainingTask, task_id)
            predictor_id = adaptation.run(session, self.settings, self.cache, task)
            training_queue.finish(task, predictor_id=predictor_id)

    def _reporter(self, task_id: int) -> Callable[[int, int], None]:
        """A progress callback that renews the lease now and then, and stops a task lost to another worker."""
        last = time.monotonic()

        def report(step: int, total: int) -> None:
            nonlocal last
            if time.monotonic() - last < RENEW_EVERY_S:
                return
            last = time.monotonic()
            with session_scope(self.sessions) as session:
                if not training_queue.renew(session, task_id, self.name, self.settings.task_lease_s, step / total):
                    raise LeaseLost(task_id)

        return report

    def _fail(self, task_id: int, error: str) -> None:
        with session_scope(self.sessions) as session:
            task = session.get_one(TrainingTask, task_id)
            training_queue.finish(task, error=error)
            if task.onboarding_id is not None:
                onboarding.fail(session, task.onboarding_id, error)
