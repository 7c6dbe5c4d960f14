"""An adaptation task: gather a device's measurements, fit the newest base predictor to them,
score it on the device's other measurements, and hand the result to its onboarding."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from statistics import median

from sqlalchemy import select
from sqlalchemy.orm import Session

from predictor.spaces import get_space
from server.models import Architecture, Job, Measurement, Onboarding, OnboardingStatus, TrainingTask
from server.services import onboarding as onboarding_service
from server.services import predictors
from server.services.answer_cache import PredictorCache
from server.services.predictors import Sample
from server.settings import Settings

log = logging.getLogger(__name__)
MIN_SAMPLES = 2
#: the newest measurements a validation looks at
MAX_VALIDATION = 2000
_ACTIVE_ONBOARDING = (OnboardingStatus.measuring, OnboardingStatus.adapting)


def run(session: Session, settings: Settings, cache: PredictorCache, task: TrainingTask) -> int | None:
    """The adapted predictor's id; None when a re-adaptation had nothing to do."""
    space = get_space(task.space.name)
    base = predictors.latest_base(session, space)
    if base is None:
        raise ValueError(f"no base predictor for {space.name!r}")
    device = task.device
    assert device is not None
    onboarding = session.get(Onboarding, task.onboarding_id) if task.onboarding_id is not None else None
    if onboarding is None:
        if _onboarding_active(session, task):
            return None  # the onboarding's own adaptation will use these measurements too
        samples = list(_device_measurements(session, task).values())
    else:
        samples = _onboarding_samples(session, onboarding, settings.train_on_flagged)
    if len(samples) < MIN_SAMPLES:
        if onboarding is None:
            return None
        raise ValueError(f"{len(samples)} usable measurements; adaptation needs at least {MIN_SAMPLES}")
    measured = {sample.key for sample in samples}
    validation = {key: sample.ms for key, sample in _device_measurements(session, task, MAX_VALIDATION).items()
                  if key not in measured}
    row = predictors.adapt(session, cache, base, device, samples, validation)
    if onboarding is not None:
        onboarding_service.after_adaptation(session, settings, onboarding, row, cache.get(row))
    return row.id


def _onboarding_active(session: Session, task: TrainingTask) -> bool:
    return session.scalar(
        select(Onboarding.id).where(Onboarding.device_id == task.device_id, Onboarding.space_id == task.space_id,
                                    Onboarding.status.in_(_ACTIVE_ONBOARDING)).limit(1)
    ) is not None


def _onboarding_samples(session: Session, onboarding: Onboarding, train_on_flagged: bool) -> list[Sample]:
    """The onboarding's measurements in the order they were chosen, one sample per architecture
    (the median of its measurements: a suspect sample is measured again); those whose flags put
    their median in doubt (unstable, drift) only if `train_on_flagged`, or when too few are left
    without them: a noisy host flags most runs, and adapting on them beats failing.

    An architecture whose every measurement was flagged is left out, not kept at their median: on
    reference devices (`benchmarks/flagged_samples.py`, 4 of 10 samples flagged) a sample off by a
    log-latency sd of 0.1 already costs FBNet more than losing it (rho 0.953 against 0.959), and
    the three flagged medians of one architecture spread by about that much on a noisy host."""
    measured = session.execute(
        select(Architecture.key, Measurement.latency_ms, Measurement.valid, Measurement.created_at)
        .join(Job, Job.measurement_id == Measurement.id)
        .join(Architecture, Architecture.id == Job.architecture_id)
        .where(Job.onboarding_id == onboarding.id)
        .order_by(Job.id)
    ).all()
    samples = _per_architecture([(key, ms, at) for key, ms, valid, at in measured if valid or train_on_flagged])
    if len(samples) < MIN_SAMPLES:
        log.warning("onboarding %s: %d unflagged measurements; using the flagged ones too", onboarding.id, len(samples))
        samples = _per_architecture([(key, ms, at) for key, ms, _, at in measured])
    return list(samples.values())


def _device_measurements(session: Session, task: TrainingTask, newest: int | None = None) -> dict[str, Sample]:
    """The device's valid measurements in the space (of the `newest` ones), one sample per
    architecture: the median of its measurements."""
    query = (
        select(Architecture.key, Measurement.latency_ms, Measurement.created_at)
        .join(Architecture, Architecture.id == Measurement.architecture_id)
        .where(Measurement.device_id == task.device_id, Architecture.space_id == task.space_id, Measurement.valid)
        .order_by(Measurement.id.desc())
        .limit(newest)
    )
    return _per_architecture(session.execute(query))


def _per_architecture(measured: Iterable[tuple[str, float, datetime]]) -> dict[str, Sample]:
    """One sample per architecture key, in the order keys first appear: the median of its
    measurements, as of the newest."""
    grouped: dict[str, list[tuple[float, datetime]]] = defaultdict(list)
    for key, ms, at in measured:
        grouped[key].append((ms, at))
    return {key: Sample(key, median(ms for ms, _ in values), max(at for _, at in values))
            for key, values in grouped.items()}
