"""The agent's persistent state in its state directory, like a CI runner's credentials file.

- `credentials.json`: {server, agent_id, agent_token} of the last successful registration. On
  start the agent presents the stored token to the same server to re-register as the same agent.
- `outbox/<job_id>.json`: results the server has not acknowledged yet, as {job_id, server,
  result}. A result is written here before it is posted and deleted once the server accepted it
  or refused it for good, so it survives an unreachable server and a restart of the agent.
  Results are only ever sent to the server they were measured for.

Files are written atomically (a temporary file in the same directory, then `os.replace`) and are
readable by their owner only: the credentials file holds a bearer token. A running agent holds
`agent.lock` (an advisory lock, released however the process ends), so that two agents on one
host cannot share an identity and each other's results: each needs a state directory of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ValidationError

from agent.protocol import JobResult

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one agent per state directory is up to the user
    fcntl = None  # type: ignore[assignment]  # the lock code checks for None

log = logging.getLogger(__name__)

CREDENTIALS_FILE = "credentials.json"
OUTBOX_DIR = "outbox"
LOCK_FILE = "agent.lock"


class StateInUse(Exception):
    """Another running agent holds the state directory."""


class Credentials(BaseModel):
    server: str
    agent_id: int
    agent_token: str


class OutboxEntry(BaseModel):
    job_id: int
    server: str
    result: JobResult


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one step, as a file only its owner may read (mode 0600)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


class AgentState:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self.credentials_path = self.root / CREDENTIALS_FILE
        self.outbox_dir = self.root / OUTBOX_DIR
        self._reported: set[Path] = set()  # outbox files already logged as not for this server

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the state directory for this agent alone; raises StateInUse when another one does."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = path.read_text(errors="replace").strip() or "unknown"
                    raise StateInUse(
                        f"state directory {self.root} is in use by another agent (pid {holder}); "
                        "give each agent a state directory of its own (--state-dir)"
                    ) from None
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------- credentials

    def load_credentials(self, server: str) -> Credentials | None:
        """The stored credentials for `server`; None when there are none, they are for another
        server, or the file is unreadable."""
        try:
            credentials = Credentials.model_validate_json(self.credentials_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            log.warning("ignoring unreadable %s: %s", self.credentials_path, exc)
            return None
        return credentials if credentials.server == server else None

    def save_credentials(self, credentials: Credentials) -> None:
        write_atomic(self.credentials_path, credentials.model_dump_json().encode())

    # ------------------------------------------------------------------ outbox

    def _outbox_path(self, job_id: int) -> Path:
        return self.outbox_dir / f"{job_id}.json"

    def outbox_put(self, server: str, job_id: int, result: JobResult) -> None:
        entry = OutboxEntry(job_id=job_id, server=server, result=result)
        write_atomic(self._outbox_path(job_id), entry.model_dump_json().encode())

    def outbox_remove(self, job_id: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._outbox_path(job_id).unlink()

    def outbox_entries(self, server: str) -> list[OutboxEntry]:
        """The results waiting to be sent to `server`, oldest job first. A file that cannot be
        read is renamed to `<name>.corrupt`, so that it is reported once and kept for a human."""
        entries: list[OutboxEntry] = []
        for path in self.outbox_dir.glob("*.json"):
            try:
                entry = OutboxEntry.model_validate_json(path.read_bytes())
            except FileNotFoundError:
                continue
            except (OSError, ValidationError) as exc:
                log.error("outbox file %s is unreadable (%s); renaming it to %s.corrupt", path, exc, path.name)
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name + ".corrupt"))
                continue
            if entry.server == server:
                entries.append(entry)
            elif path not in self._reported:
                self._reported.add(path)
                log.warning("outbox file %s holds a result for %s, not this server; leaving it", path, entry.server)
        return sorted(entries, key=lambda entry: entry.job_id)
