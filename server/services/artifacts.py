"""Content-addressed artifact storage and on-demand export of architectures in the format of a
runtime (`agent.protocol.ARTIFACT_FORMATS`): ONNX, torch.export or LiteRT."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import onnx
from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.protocol import ArtifactFormat
from predictor.export import export_onnx, export_tflite, export_torch, litert_export_problem
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

    def read(self, sha256: str) -> bytes | None:
        """The stored bytes of `sha256`, or None: a model source of the `onnx` space."""
        path = self.path(sha256)
        return path.read_bytes() if path.exists() else None

    def put(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.path(sha256)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as handle:
                handle.write(data)
            os.replace(handle.name, target)
        return sha256


#: a TensorFlow Lite flatbuffer's file identifier, at bytes 4-8
_TFLITE_IDENTIFIER = b"TFL3"


def checked_format(data: bytes) -> ArtifactFormat:
    """The format of an uploaded model: LiteRT when the bytes carry its identifier and the LiteRT
    interpreter loads them and allocates their tensors, else ONNX as `check_onnx_upload` accepts it.
    Raises Invalid (422) otherwise."""
    if data[4:8] == _TFLITE_IDENTIFIER:
        from ai_edge_litert.interpreter import Interpreter

        try:
            Interpreter(model_content=data).allocate_tensors()
        except Exception as exc:  # the interpreter raises ValueError or RuntimeError for a bad model
            raise Invalid(f"not a valid LiteRT model: {exc}", "body") from exc
        return ArtifactFormat.tflite
    check_onnx_upload(data)
    return ArtifactFormat.onnx


# One export at a time: exports are CPU-heavy and the same architecture is often asked for at once
# (every new device's canary). Exports are deterministic, so each is done once per process.
_export_lock = threading.Lock()
_exported: dict[tuple[str, str, ArtifactFormat], tuple[str, int]] = {}
#: formats whose export takes tens of seconds (LiteRT: torch.export, FX passes, MLIR lowering). A
#: lease does not wait for one inside its transaction (which would hold the database's write lock
#: on SQLite meanwhile): it starts the export on a thread of its own and leaves the job queued.
SLOW_FORMATS = frozenset({ArtifactFormat.tflite})
_slow_exports = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slow-export")
_pending_lock = threading.Lock()
_pending: dict[tuple[str, str, ArtifactFormat], Future[tuple[str, int]]] = {}


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
    existing = _stored(session, store, arch, fmt)
    if existing is not None:
        return existing
    sha256, size = _export(store, arch.space.name, arch.key, fmt)
    insert_missing(session, Artifact, [{"sha256": sha256, "architecture_id": arch.id, "format": fmt.value,
                                        "size_bytes": size}])
    return session.get_one(Artifact, sha256)


def export_pending(session: Session, store: ArtifactStore, arch: Architecture, fmt: ArtifactFormat) -> bool:
    """True while the export of a slow format is running (started here when it is not yet
    stored); False once `materialise` will not wait for it. Raises the export's exception once,
    when it failed (the next call tries again)."""
    if fmt not in SLOW_FORMATS or _stored(session, store, arch, fmt) is not None:
        return False
    key = (arch.space.name, arch.key, fmt)
    with _pending_lock:
        future = _pending.get(key)
        if future is None:
            future = _pending[key] = _slow_exports.submit(_export, store, *key)
        if not future.done():
            return True
        del _pending[key]
    future.result()
    return False


def _stored(session: Session, store: ArtifactStore, arch: Architecture, fmt: ArtifactFormat) -> Artifact | None:
    existing = session.scalar(
        select(Artifact).where(Artifact.architecture_id == arch.id, Artifact.format == fmt.value).limit(1)
    )
    return existing if existing is not None and store.path(existing.sha256).exists() else None


def _export(store: ArtifactStore, space: str, key: str, fmt: ArtifactFormat) -> tuple[str, int]:
    with _export_lock:
        done = _exported.get((space, key, fmt))
        if done is None or not store.path(done[0]).exists():
            data = _EXPORTERS[fmt](get_space(space), key)
            done = _exported[(space, key, fmt)] = store.put(data), len(data)
        return done
