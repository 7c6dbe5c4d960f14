"""Content-addressed artifact storage and on-demand ONNX materialisation of architectures."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from predictor.export import export_onnx
from predictor.spaces import get_space
from server.models import Architecture, Artifact


class ArtifactStore:
    """Files named by the sha256 of their bytes, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.onnx"

    def put(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.path(sha256)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as handle:
                handle.write(data)
            os.replace(handle.name, target)
        return sha256


# One export at a time: exports are CPU-heavy and the same architecture is often asked for twice.
_export_lock = threading.Lock()


def materialise(session: Session, store: ArtifactStore, arch: Architecture) -> Artifact:
    """The ONNX artifact of an architecture, exported and stored on first request."""
    existing = session.scalar(select(Artifact).where(Artifact.architecture_id == arch.id))
    if existing is not None and store.path(existing.sha256).exists():
        return existing
    with _export_lock:
        data = export_onnx(get_space(arch.space.name), arch.key)
    sha256 = store.put(data)
    artifact = session.get(Artifact, sha256)
    if artifact is None:
        artifact = Artifact(sha256=sha256, architecture_id=arch.id, format="onnx", size_bytes=len(data))
        session.add(artifact)
        session.flush()
    return artifact
