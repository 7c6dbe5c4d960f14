"""Content-addressed artifact storage and on-demand export of architectures (ONNX or torch.export)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import onnx
from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.protocol import ArtifactFormat
from predictor.export import export_onnx, export_torch
from predictor.spaces import get_space
from server.db import insert_missing
from server.errors import Invalid
from server.models import Architecture, Artifact


def check_onnx_upload(data: bytes) -> None:
    """422 unless `data` is a self-contained ONNX model that onnx.checker accepts.

    Tensors stored as external data are refused before the checker runs: it would look their
    files up relative to the server's working directory, telling an uploader which files exist
    there (and an agent could not fetch them anyway)."""
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # onnx raises several unrelated types for malformed bytes
        raise Invalid(f"not a valid ONNX model: {exc}", "body") from exc
    if any(tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data
           for tensor in _tensors(model.graph)):
        raise Invalid("an uploaded ONNX model must hold all its tensors; external data is refused", "body")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise Invalid(f"not a valid ONNX model: {exc}", "body") from exc


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of a graph: initializers, sparse ones, node attributes, subgraphs'."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield from (attribute.sparse_tensor.values, attribute.sparse_tensor.indices)
            for subgraph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                yield from _tensors(subgraph)


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


_EXPORTERS = {ArtifactFormat.onnx: export_onnx, ArtifactFormat.torch_export: export_torch}


def materialise(session: Session, store: ArtifactStore, arch: Architecture,
                fmt: ArtifactFormat = ArtifactFormat.onnx) -> Artifact:
    """The artifact of an architecture in a format, exported and stored on first request.

    Concurrent requests for the same export (whose artifact rows are not committed yet) wait for
    the first and share its file; the row is inserted race-free."""
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
