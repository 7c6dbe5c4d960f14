"""Onboarding: sampler-chosen jobs on a new device, then adaptation once they are measured."""

from __future__ import annotations

import logging

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from agent.protocol import Preset
from predictor import get_sampler
from predictor.spaces import SearchSpace, get_space
from server.db import session_scope
from server.errors import Conflict, Invalid
from server.models import Architecture, Device, Job, JobStatus, Measurement, Onboarding, OnboardingStatus, utcnow
from server.services import jobs, predictors
from server.services.catalog import ensure_architecture, space_row
from server.settings import Settings

log = logging.getLogger(__name__)
MIN_SAMPLES = 2


def start(session: Session, settings: Settings, cache: predictors.PredictorCache, device: Device, space: SearchSpace,
          samples: int, sampler_name: str, preset: Preset, seed: int) -> Onboarding:
    """Queue a job per sampler-chosen architecture; valid earlier measurements are reused."""
    base = predictors.latest_base(session, space)
    if base is None:
        raise Conflict(f"no base predictor for {space.name!r}: pre-train one first (POST /api/v1/predictors/pretrain)",
                       "space")
    try:
        sampler = get_sampler(sampler_name)
    except ValueError as exc:
        raise Invalid(str(exc), "sampler") from exc
    keys = sampler.select(space, samples, seed=seed, predictor=cache.get(base))
    onboarding = Onboarding(device_id=device.id, space_id=space_row(session, space).id, sampler=sampler.name,
                            samples=samples)
    session.add(onboarding)
    session.flush()
    for key in keys:
        target = jobs.Target(architecture_id=ensure_architecture(session, space, key).id)
        jobs.submit(session, settings, target, device=device, preset=preset, onboarding_id=onboarding.id)
    return onboarding


def progress(session: Session, onboarding: Onboarding) -> dict[str, int]:
    counts = dict(
        session.execute(
            select(Job.status, func.count()).where(Job.onboarding_id == onboarding.id).group_by(Job.status)
        ).all()
    )
    return {
        "jobs_total": sum(counts.values()),
        "jobs_done": counts.get(JobStatus.done, 0),
        "jobs_failed": counts.get(JobStatus.failed, 0) + counts.get(JobStatus.cancelled, 0),
    }


def finish_if_measured(factory: sessionmaker[Session], cache: predictors.PredictorCache, onboarding_id: int,
                       train_on_flagged: bool = False) -> None:
    """Adapt the base predictor once every job of the onboarding has finished (runs once).

    Measurements flagged unstable, drift or short are left out unless `train_on_flagged`.
    """
    with session_scope(factory) as session:
        unfinished = session.scalar(
            select(func.count()).where(Job.onboarding_id == onboarding_id, Job.status.not_in(jobs.FINISHED))
        )
        if unfinished:
            return
        claimed = session.execute(
            update(Onboarding)
            .where(Onboarding.id == onboarding_id, Onboarding.status == OnboardingStatus.measuring)
            .values(status=OnboardingStatus.adapting)
        ).rowcount
    if claimed != 1:
        return
    try:
        with session_scope(factory) as session:
            onboarding = session.get_one(Onboarding, onboarding_id)
            measured = session.execute(
                select(Architecture.key, Measurement.latency_ms, Measurement.valid)
                .join(Job, Job.measurement_id == Measurement.id)
                .join(Architecture, Architecture.id == Job.architecture_id)
                .where(Job.onboarding_id == onboarding_id)
            ).all()
            samples = {key: ms for key, ms, valid in measured if valid or train_on_flagged}
            if len(samples) < MIN_SAMPLES:  # a noisy host flags most runs: adapt on them rather than fail
                log.warning("onboarding %s: %d unflagged measurements; using the flagged ones too", onboarding_id,
                            len(samples))
                samples = {key: ms for key, ms, _ in measured}
            base = predictors.latest_base(session, get_space(onboarding.space.name))
            if base is None or len(samples) < MIN_SAMPLES:
                raise ValueError(f"{len(samples)} usable measurements ({len(measured) - len(samples)} more flagged "
                                 "unstable, drift or short); adaptation needs at least 2")
            adapted = predictors.adapt(session, cache, base, onboarding.device, samples)
            onboarding.predictor_id = adapted.id
            onboarding.status, onboarding.finished_at = OnboardingStatus.ready, utcnow()
    except Exception as exc:  # recorded on the onboarding, in a transaction of its own; the server goes on
        log.exception("onboarding %s failed", onboarding_id)
        with session_scope(factory) as session:
            onboarding = session.get_one(Onboarding, onboarding_id)
            onboarding.status, onboarding.error, onboarding.finished_at = OnboardingStatus.failed, str(exc), utcnow()
