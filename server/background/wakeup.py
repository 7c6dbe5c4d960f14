"""Wake long-polling agents as soon as a job may be claimable on one of their devices.

Code that queues or frees a job calls `jobs_changed(session, device_id)` (None: a selector job,
any device may take it). When that session commits, the long polls of this process that serve
the device wake; on Postgres a `NOTIFY` sent in the same transaction carries the devices to the
long polls of every other server process sharing the database, through a `LISTEN` thread (a
process skips its own notices: it woke its polls already). Only
the agents of that device wake, so a finished job does not make a hundred idle agents query the
queue. Waiters also re-check on their own every few seconds, so a lost wake-up only costs latency.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy import event, text
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

CHANNEL = "latfarm_jobs"
ANY_DEVICE = "*"
_PENDING = "latfarm_jobs_changed"
#: a NOTIFY payload must stay under 8000 bytes; longer device lists become "any device"
NOTIFY_MAX_DEVICES_CHARS = 7000


def jobs_changed(session: Session, device_id: int | None) -> None:
    """Wake the long polls of `device_id` (None: of every device) once this session commits."""
    session.info.setdefault(_PENDING, set()).add(ANY_DEVICE if device_id is None else str(device_id))


def device_taken(session: Session, device_id: int) -> None:
    """The device got a job in this session, so its long polls have nothing to find: do not wake
    them for it (its previous job's result, in the same session, freed it only for a moment)."""
    session.info.get(_PENDING, set()).discard(str(device_id))


class JobWakeup:
    def __init__(self, sessions: sessionmaker[Session], postgres_dsn: str | None) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._dsn = postgres_dsn
        self._origin = uuid.uuid4().hex
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None
        if postgres_dsn is not None:
            event.listen(sessions, "before_commit", self._notify)
        event.listen(sessions, "after_commit", self._after_commit)
        event.listen(sessions, "after_rollback", lambda session: session.info.pop(_PENDING, None))

    def start(self) -> None:
        """Call from the event loop that serves the long polls."""
        self._loop = asyncio.get_running_loop()
        if self._dsn is not None:
            self._listener = threading.Thread(target=self._listen, name="job-wakeup", daemon=True)
            self._listener.start()

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=5)

    @contextmanager
    def subscription(self, device_ids: Collection[int]) -> Iterator[asyncio.Event]:
        """An event set whenever a job may have become claimable on one of `device_ids`.
        Clear it before looking at the queue: a change during the look still sets it."""
        keys = [str(device_id) for device_id in device_ids] + [ANY_DEVICE]
        woken = asyncio.Event()
        for key in keys:
            self._waiters.setdefault(key, set()).add(woken)
        try:
            yield woken
        finally:
            for key in keys:
                self._waiters[key].discard(woken)

    @staticmethod
    async def wait(woken: asyncio.Event, timeout_s: float) -> None:
        """Return once `woken` is set, or after `timeout_s`."""
        try:
            await asyncio.wait_for(woken.wait(), timeout_s)
        except TimeoutError:
            pass

    def wake(self, targets: Collection[str]) -> None:
        """Wake the waiters of these devices (ANY_DEVICE: everyone). Thread-safe."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake_in_loop, tuple(targets))

    def _wake_in_loop(self, targets: tuple[str, ...]) -> None:
        keys = list(self._waiters) if ANY_DEVICE in targets else targets
        for key in keys:
            for woken in self._waiters.get(key, ()):
                woken.set()

    def _notify(self, session: Session) -> None:
        """NOTIFY the other server processes, in the transaction that changed the jobs."""
        targets = session.info.get(_PENDING)
        if targets:
            devices = ",".join(sorted(targets))
            payload = f"{self._origin}:{devices if len(devices) < NOTIFY_MAX_DEVICES_CHARS else ANY_DEVICE}"
            session.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": payload})

    def _after_commit(self, session: Session) -> None:
        targets = session.info.pop(_PENDING, None)
        if targets:
            self.wake(targets)

    def _listen(self) -> None:
        assert self._dsn is not None
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    while not self._stop.is_set():
                        targets = {target for notice in conn.notifies(timeout=0.5)
                                   for origin, _, devices in [notice.payload.partition(":")]
                                   if origin != self._origin for target in devices.split(",")}
                        if targets:
                            self.wake(targets)
            except psycopg.Error as exc:
                log.warning("LISTEN %s failed (%s); long polls fall back to re-checking", CHANNEL, exc)
                self._stop.wait(5.0)
