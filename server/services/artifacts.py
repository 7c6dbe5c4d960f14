"""Content-addressed artifact storage and on-demand export of architectures in the format of a
runtime (`agent.protocol.ARTIFACT_FORMATS`): ONNX, torch.export or LiteRT."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.protocol import ArtifactFormat
from predictor.export import export_onnx, export_tflite, export_torch, litert_export_problem
from predictor.spaces import get_space
from server.db import insert_missing
from server.models import Architecture, Artifact


class ArtifactStore:
    """Files named by the sha256 of their bytes, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.path(sha256)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as handle:
                handle.write(data)
            os.replace(handle.name, target)
        return sha256


# One export at a time: exports are CPU-heavy and the same architecture is often asked for at once
# (every new device's canary). Exports are deterministic, so each is done once per process.
_export_lock = threading.Lock()
_exported: dict[tuple[str, str, ArtifactFormat], tuple[str, int]] = {}


_EXPORTERS = {ArtifactFormat.onnx: export_onnx, ArtifactFormat.torch_export: export_torch,
              ArtifactFormat.tflite: export_tflite}


def export_problem(fmt: ArtifactFormat) -> str | None:
    """Why this server cannot export architectures in `fmt` (its exporter is an optional extra), or None."""
    return litert_export_problem() if fmt is ArtifactFormat.tflite else None


def materialise(session: Session, store: ArtifactStore, arch: Architecture,
                fmt: ArtifactFormat = ArtifactFormat.onnx) -> Artifact:
    """The artifact of an architecture in a format, exported and stored on first request.

    Concurrent requests for the same export (whose artifact rows are not committed yet) wait for
    the first and share its file; the row is inserted race-free. Raises ExportUnavailable when the
    format's exporter is not installed."""
    existing = session.scalar(
        select(Artifact).where(Artifact.architecture_id == arch.id, Artifact.format == fmt.value).limit(1)
    )
    if existing is not None and store.path(existing.sha256).exists():
        return existing
    sha256, size = _export(store, arch.space.name, arch.key, fmt)
    insert_missing(session, Artifact, [{"sha256": sha256, "architecture_id": arch.id, "format": fmt.value,
                                        "size_bytes": size}])
    return session.get_one(Artifact, sha256)


def _export(store: ArtifactStore, space: str, key: str, fmt: ArtifactFormat) -> tuple[str, int]:
    with _export_lock:
        done = _exported.get((space, key, fmt))
        if done is None or not store.path(done[0]).exists():
            data = _EXPORTERS[fmt](get_space(space), key)
            done = _exported[(space, key, fmt)] = store.put(data), len(data)
        return done
