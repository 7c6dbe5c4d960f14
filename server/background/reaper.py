"""The server's housekeeping pass: expired leases, run timeouts, queue deadlines, offline
devices and re-check canaries. Every server process runs it; row locks keep passes apart."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from server import metrics
from server.background.wakeup import jobs_changed
from server.db import session_scope
from server.models import Agent, AgentDevice, Device, DeviceState, Job, JobKind, JobStatus, as_utc, utcnow
from server.services import health
from server.services.jobs import release_device, retry
from server.settings import Settings

log = logging.getLogger(__name__)


def reap(session: Session, settings: Settings) -> set[int]:
    """One pass; returns the onboardings whose jobs it finished."""
    now = utcnow()
    touched: set[int] = set()
    running = session.scalars(
        select(Job).where(Job.status == JobStatus.running).with_for_update(of=Job, skip_locked=True)
    ).all()
    for job in running:
        timeout = job.run_timeout_s or settings.run_timeout_s
        if job.started_at is not None and as_utc(job.started_at) + timedelta(seconds=timeout) < now:
            release_device(job)
            job.status, job.failure_class, job.finished_at = JobStatus.failed, "run_timeout", now
            job.error = f"run timeout fired: still running {timeout:g} s after it started"
        elif job.lease_expires_at is not None and as_utc(job.lease_expires_at) < now:
            metrics.LEASE_EXPIRATIONS.inc()
            retry(job, "lease expired: the agent stopped heartbeating", settings.max_attempts, "lease_expired")
        else:
            continue
        jobs_changed(session, job.device_id)  # None after a selector job's retry: any device
        if job.onboarding_id is not None and job.status is JobStatus.failed:
            touched.add(job.onboarding_id)

    overdue = session.scalars(
        select(Job)
        .where(Job.status == JobStatus.queued, Job.deadline_at < now)
        .with_for_update(of=Job, skip_locked=True)
    ).all()
    for job in overdue:
        waited = (now - as_utc(job.created_at)).total_seconds()
        job.status, job.failure_class, job.finished_at = JobStatus.failed, "queue_deadline", now
        job.error = f"queue deadline fired: not started {waited:.0f} s after submission"
        if job.onboarding_id is not None:
            touched.add(job.onboarding_id)

    _mark_offline(session, now - timedelta(seconds=settings.offline_after_s))
    _recheck_degraded(session, settings, now - timedelta(seconds=settings.canary_recheck_s))
    return touched


def _mark_offline(session: Session, seen_before: datetime) -> None:
    last_seen = (
        select(AgentDevice.device_id, func.max(Agent.last_seen).label("seen"))
        .join(Agent, Agent.id == AgentDevice.agent_id)
        .group_by(AgentDevice.device_id)
        .subquery()
    )
    stale = session.scalars(
        select(Device)
        .join(last_seen, last_seen.c.device_id == Device.id)
        .where(Device.state.in_([DeviceState.online, DeviceState.busy]), last_seen.c.seen < seen_before)
    ).all()
    for device in stale:
        device.state, device.state_reason = DeviceState.offline, "no agent serving it was seen recently"


def _recheck_degraded(session: Session, settings: Settings, finished_before: datetime) -> None:
    for device in session.scalars(select(Device).where(Device.state == DeviceState.degraded)):
        last = session.scalar(
            select(func.max(Job.finished_at)).where(Job.device_id == device.id, Job.kind == JobKind.canary)
        )
        if last is None or as_utc(last) < finished_before:
            health.queue_canary(session, device, settings)


class Reaper(threading.Thread):
    """Runs `reap` every `settings.reaper_interval_s`; `on_onboardings` gets the touched ones."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings,
                 on_onboardings: Callable[[set[int]], None]) -> None:
        super().__init__(name="reaper", daemon=True)
        self.sessions, self.settings, self.on_onboardings = sessions, settings, on_onboardings
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.settings.reaper_interval_s):
            try:
                with session_scope(self.sessions) as session:
                    touched = reap(session, self.settings)
                if touched:
                    self.on_onboardings(touched)
            except Exception:  # noqa: BLE001 - one failed pass must not end housekeeping
                log.exception("reaper pass failed")

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
