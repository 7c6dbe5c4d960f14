"""Prometheus metrics.

Events (jobs leased and finished, retries, lease expirations, predictions) are counted where they
happen; the farm's state (queue depth, heartbeat age, canary drift) is read from the database at
scrape time, so every server process sharing it reports the same state. With several worker
processes, set PROMETHEUS_MULTIPROC_DIR to an empty folder so the event counts are summed across
them (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from server.db import session_scope
from server.models import Agent, Device, Job, as_utc, utcnow

#: seconds, from milliseconds (a predict call) to the hour a queued job may wait
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

JOB_WAIT = Histogram("latfarm_job_wait_seconds", "Time from submission (or re-queue) to lease", ["kind"],
                     buckets=_BUCKETS)
JOB_RUN = Histogram("latfarm_job_run_seconds", "Time from lease to result", ["kind", "status"], buckets=_BUCKETS)
JOB_RETRIES = Counter("latfarm_job_retries_total", "Jobs put back in the queue after an infrastructure failure",
                      ["failure_class"])
LEASE_EXPIRATIONS = Counter("latfarm_lease_expirations_total", "Leases the reaper found expired")
PREDICT_SECONDS = Histogram("latfarm_predict_seconds", "Time to answer one /predict call", buckets=_BUCKETS)
PREDICT_ARCHITECTURES = Counter("latfarm_predicted_architectures_total", "Architectures predicted")


class FarmState(Collector):
    """Gauges read from the database at each scrape."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        now = utcnow()
        jobs = GaugeMetricFamily("latfarm_jobs", "Jobs by status and kind", labels=["status", "kind"])
        heartbeat = GaugeMetricFamily("latfarm_agent_heartbeat_age_seconds",
                                      "Seconds since the agent last polled, heartbeated or posted", labels=["agent"])
        drift = GaugeMetricFamily("latfarm_device_canary_drift_ratio",
                                  "Last canary median over the device's baseline, minus one", labels=["device"])
        states = GaugeMetricFamily("latfarm_devices", "Devices served by agents, by state", labels=["state"])
        with session_scope(self.sessions) as session:
            for status, kind, count in session.execute(
                select(Job.status, Job.kind, func.count()).group_by(Job.status, Job.kind)
            ):
                jobs.add_metric([status.value, kind.value], count)
            for agent_id, name, last_seen in session.execute(select(Agent.id, Agent.name, Agent.last_seen)):
                if last_seen is not None:
                    heartbeat.add_metric([f"{agent_id}:{name}"], (now - as_utc(last_seen)).total_seconds())
            devices = session.execute(
                select(Device.name, Device.state, Device.canary_baseline_ms, Device.canary_last_ms)
                .where(Device.source != "imported")
            ).all()
        for state in sorted({row.state.value for row in devices}):
            states.add_metric([state], sum(row.state.value == state for row in devices))
        for row in devices:
            if row.canary_baseline_ms and row.canary_last_ms is not None:
                drift.add_metric([row.name], row.canary_last_ms / row.canary_baseline_ms - 1)
        yield from (jobs, heartbeat, drift, states)


def exposition(sessions: sessionmaker[Session]) -> bytes:
    """The text exposition of this process's (or all worker processes') events and the farm's state."""
    registry = CollectorRegistry()
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        multiprocess.MultiProcessCollector(registry)
    else:
        for collector in (JOB_WAIT, JOB_RUN, JOB_RETRIES, LEASE_EXPIRATIONS, PREDICT_SECONDS, PREDICT_ARCHITECTURES):
            registry.register(collector)
    registry.register(FarmState(sessions))
    return generate_latest(registry)
