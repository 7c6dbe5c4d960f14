"""Device health: a fixed canary architecture measured at registration and every K jobs.

The first valid canary median is the device's baseline. A later valid canary that moves more
than `canary_drift` from it marks the device degraded: it then gets canary jobs only, until a
re-check canary comes back within the threshold.
"""

from __future__ import annotations

from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session

from agent.protocol import Preset
from predictor.spaces import get_space
from server.background.wakeup import jobs_changed
from server.models import Device, DeviceState, Job, JobKind, JobStatus, Predictor, PredictorStatus
from server.services.catalog import ensure_architecture
from server.settings import Settings

CANARY_SPACE = "nb201"
#: a mid-sized NB201 cell: long enough to time stably, short enough to cost a second
CANARY_ARCH = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"
CANARY_PRIORITY = 1_000_000  # ahead of every user job (user priorities are within +-1000)


def queue_canary(session: Session, device: Device, settings: Settings) -> Job | None:
    """Queue a canary for the device unless one is already queued or running."""
    pending = session.scalar(
        select(exists().where(Job.device_id == device.id, Job.kind == JobKind.canary,
                              Job.status.in_([JobStatus.queued, JobStatus.running])))
    )
    if pending:
        return None
    arch = ensure_architecture(session, get_space(CANARY_SPACE), CANARY_ARCH)
    job = Job(kind=JobKind.canary, device_id=device.id, architecture_id=arch.id, preset=Preset.standard.value,
              priority=CANARY_PRIORITY, force=True, run_timeout_s=settings.run_timeout_s)
    session.add(job)
    device.jobs_since_canary = 0
    jobs_changed(session, device.id)
    return job


def judge_canary(session: Session, device: Device, job_id: int, measured: tuple[float, bool] | None,
                 failure: str, settings: Settings) -> None:
    """Judge the device by its canary job's (median, valid) measurement, or by its `failure`."""
    was_degraded = device.state is DeviceState.degraded
    if measured is None:
        _degrade(device, f"canary job {job_id} failed: {failure}")
    else:
        _compare_with_baseline(device, *measured, settings.canary_drift)
    if device.state is DeviceState.degraded and not was_degraded:
        _mark_predictors_stale(session, device)


def _compare_with_baseline(device: Device, median_ms: float, valid: bool, drift_threshold: float) -> None:
    device.canary_last_ms = median_ms
    if not valid:
        return  # a flagged (noisy) canary can neither set the baseline nor show drift
    if device.canary_baseline_ms is None:
        device.canary_baseline_ms = median_ms
        return
    drift = median_ms / device.canary_baseline_ms - 1
    if abs(drift) > drift_threshold:
        _degrade(device, f"canary {median_ms:.3f} ms is {drift:+.0%} off its baseline {device.canary_baseline_ms:.3f} ms "
                         f"(threshold {drift_threshold:.0%})")
    elif device.state is DeviceState.degraded:
        device.state, device.state_reason = DeviceState.online, None


def _mark_predictors_stale(session: Session, device: Device) -> None:
    """The device no longer times as it did when its predictors were fitted."""
    session.execute(
        update(Predictor)
        .where(Predictor.device_id == device.id, Predictor.status == PredictorStatus.ready)
        .values(status=PredictorStatus.stale)
    )


def _degrade(device: Device, reason: str) -> None:
    if device.state is not DeviceState.retired:
        device.state, device.state_reason = DeviceState.degraded, reason
