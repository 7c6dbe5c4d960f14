"""Onboarding: sampler-chosen jobs on a new device, adaptation once they are measured, and, with a
budget, more rounds of the networks whose measurements most cut the predictor's uncertainty."""

from __future__ import annotations

import logging

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from agent.protocol import Preset
from predictor import LatencyPredictor, get_sampler
from predictor.samplers import DefaultSampler, candidate_keys
from predictor.spaces import SearchSpace
from server.db import affected_rows, session_scope
from server.errors import Conflict, Invalid
from server.models import (
    Architecture,
    Collection,
    Device,
    Job,
    JobStatus,
    Measurement,
    Onboarding,
    OnboardingStatus,
    Predictor,
    utcnow,
)
from server.services import collections, jobs, predictors, training_queue
from server.services.answer_cache import PredictorCache
from server.services.catalog import ensure_architecture, space_row
from server.settings import Settings

log = logging.getLogger(__name__)
#: architectures measured per active-learning round
ACTIVE_STEP = 5
#: further measurements of a suspect or untrusted sample
REMEASUREMENTS = 2


def start(session: Session, settings: Settings, cache: PredictorCache, device: Device, space: SearchSpace,
          samples: int, sampler_name: str, preset: Preset, seed: int, budget: int | None = None,
          target_uncertainty: float | None = None, collection: Collection | None = None) -> Onboarding:
    """Queue a job per sampler-chosen architecture (of `collection`, if named); valid earlier
    measurements are reused."""
    if collection is not None and space.name != collections.ONNX:
        raise Invalid(f"a collection holds ONNX models: onboard it in space {collections.ONNX!r}", "space")
    candidates = collections.encoded(collections.members(collection), "collection") if collection else None
    if collection is not None and candidates is not None and samples > len(candidates):
        raise Invalid(f"collection {collection.name!r} has {len(candidates)} models, fewer than {samples} samples",
                      "samples")
    base = predictors.latest_base(session, space)
    if base is None:
        raise Conflict(f"no base predictor for {space.name!r}: pre-train one first (POST /api/v1/predictors/pretrain)",
                       "space")
    if budget is not None and budget < samples:
        raise Invalid(f"budget {budget} is below the {samples} first samples", "budget")
    try:
        sampler = get_sampler(sampler_name)
    except ValueError as exc:
        raise Invalid(str(exc), "sampler") from exc
    model = cache.get(base)
    keys = sampler.select(space, samples, seed=seed, predictor=model, candidates=candidates)
    # "default" resolves to a named sampler (design, or what pre-training validated): record it
    name = sampler.resolve(samples, model) if isinstance(sampler, DefaultSampler) else sampler.name
    onboarding = Onboarding(device_id=device.id, space_id=space_row(session, space).id, sampler=name,
                            samples=samples, preset=preset.value, budget=budget,
                            target_uncertainty=target_uncertainty,
                            collection_id=collection.id if collection is not None else None)
    session.add(onboarding)
    session.flush()
    _submit(session, settings, onboarding, space, keys)
    return onboarding


def _submit(session: Session, settings: Settings, onboarding: Onboarding, space: SearchSpace,
            keys: list[str]) -> None:
    for key in keys:
        target = jobs.Target(architecture_id=ensure_architecture(session, space, key).id)
        jobs.submit(session, settings, target, device=onboarding.device, preset=Preset(onboarding.preset),
                    onboarding_id=onboarding.id)


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


def finish_if_measured(sessions: sessionmaker[Session], onboarding_id: int) -> None:
    """Queue the adaptation once every job of the onboarding has finished (once per round).

    Runs after the transaction that finished a job committed, so the last job's finisher sees
    every job finished."""
    with session_scope(sessions) as session:
        _adapt_if_measured(session, onboarding_id)


def _adapt_if_measured(session: Session, onboarding_id: int) -> None:
    unfinished = session.scalar(
        select(func.count()).where(Job.onboarding_id == onboarding_id, Job.status.not_in(jobs.FINISHED))
    )
    if unfinished:
        return
    claimed = affected_rows(
        session,
        update(Onboarding)
        .where(Onboarding.id == onboarding_id, Onboarding.status == OnboardingStatus.measuring)
        .values(status=OnboardingStatus.adapting)
    )
    if claimed == 1:
        onboarding = session.get_one(Onboarding, onboarding_id)
        training_queue.enqueue_adaptation(session, onboarding.space_id, onboarding.device_id, onboarding_id)


def after_adaptation(session: Session, settings: Settings, onboarding: Onboarding, row: Predictor,
                     model: LatencyPredictor, seed: int = 0) -> None:
    """Record the round; measure twice more each architecture measured once whose measurement the
    agent did not trust or whose sample the fit finds suspect (`_to_measure_again`: adaptation
    then takes the median of the trusted ones); else,
    while the budget allows and the mean relative uncertainty over the space is above the target,
    measure next the networks whose measurements most cut the predictor's uncertainty
    (`LatencyPredictor.most_informative`), none already requested; else the device is ready.

    The budget counts architectures measured, flagged measurements included: each cost a run; a
    re-measurement adds no architecture."""
    runs = _runs_per_architecture(session, onboarding)
    requested = set(runs)
    members = collections.members(onboarding.collection) if onboarding.collection is not None else None
    requested_networks = {model.space.network_key(key) for key in requested}
    pool = [key for key in candidate_keys(model.space, seed, members)
            if model.space.network_key(key) not in requested_networks]
    ms, std = model.predict(pool)
    relative = std / ms
    # a collection whose every member was measured leaves nothing uncertain (and a mean of nothing is NaN)
    uncertainty = float(relative.mean()) if pool else 0.0
    onboarding.predictor_id = row.id
    recheck = _to_measure_again(runs, settings, model)
    onboarding.rounds = [*onboarding.rounds,
                         {"samples": len(requested), "uncertainty": round(uncertainty, 4), "predictor_id": row.id,
                          "remeasuring": recheck}]
    if recheck:
        # a suspect sample is measured twice more and the median of the three kept: a mis-measured
        # one is corrected, a true surprise confirmed, and nothing is dropped; an untrusted one
        # (left out of the fit) gets two more chances to count
        onboarding.status = OnboardingStatus.measuring
        for key in recheck:
            target = jobs.Target(architecture_id=ensure_architecture(session, model.space, key).id)
            for _ in range(REMEASUREMENTS):
                jobs.submit(session, settings, target, device=onboarding.device, preset=Preset(onboarding.preset),
                            force=True, onboarding_id=onboarding.id)
        return
    room = (onboarding.budget or 0) - len(requested)
    if room > 0 and uncertainty > (onboarding.target_uncertainty or 0.0):
        onboarding.status = OnboardingStatus.measuring
        _submit(session, settings, onboarding, model.space, model.most_informative(pool, min(ACTIVE_STEP, room)))
        session.flush()
        _adapt_if_measured(session, onboarding.id)  # every pick may have been measured before
        return
    onboarding.status, onboarding.finished_at = OnboardingStatus.ready, utcnow()


def _runs_per_architecture(session: Session, onboarding: Onboarding) -> dict[str, tuple[int, int]]:
    """Per architecture the onboarding requested: its jobs, and how many of their measurements the
    agent did not trust (`unstable`, `drift`)."""
    rows = session.execute(
        select(Architecture.key, func.count(Job.id), func.sum(case((Measurement.valid.is_(False), 1), else_=0)))
        .join(Job, Job.architecture_id == Architecture.id)
        .outerjoin(Measurement, Measurement.id == Job.measurement_id)
        .where(Job.onboarding_id == onboarding.id).group_by(Architecture.key)
    ).all()
    return {key: (jobs_run, untrusted) for key, jobs_run, untrusted in rows}


def _to_measure_again(runs: dict[str, tuple[int, int]], settings: Settings, model: LatencyPredictor) -> list[str]:
    """The architectures measured once (`runs`, `_runs_per_architecture`) that adaptation could
    not take at face value: the agent did not trust the measurement (left out of the fit unless
    `train_on_flagged`; a busy host flags many, and an onboarding of 6 models adapted on the 3
    left ranked the other 6 at rho -0.71), or the adapted `model` finds the sample likelier
    mis-measured than not (`LatencyPredictor.suspect_samples`)."""
    suspects = set(model.suspect_samples())
    left_out = not settings.train_on_flagged
    return sorted(key for key, (jobs_run, untrusted) in runs.items()
                  if jobs_run == 1 and ((untrusted and left_out) or model.network_key(key) in suspects))


def fail(session: Session, onboarding_id: int, error: str) -> None:
    onboarding = session.get_one(Onboarding, onboarding_id)
    onboarding.status, onboarding.error, onboarding.finished_at = OnboardingStatus.failed, error, utcnow()
