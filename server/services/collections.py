"""Uploaded ONNX models as members of the `onnx` space, and collections of them.

An upload is stored by the sha256 of its bytes and becomes the `onnx` architecture of that key,
so jobs, measurements, onboarding and /predict treat it like any architecture. A collection
names a set of uploads: a user's candidates, onboarded and predicted like a space.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from agent.protocol import ArtifactFormat
from predictor.spaces import InvalidArchitecture, get_space
from server.db import session_scope
from server.errors import Conflict, Invalid, NotFound
from server.models import Artifact, Collection, CollectionMember
from server.services.artifacts import ArtifactStore, checked_format
from server.services.catalog import ensure_architecture

ONNX = "onnx"


def upload(session: Session, store: ArtifactStore, data: bytes) -> Artifact:
    """Check, store and register an uploaded model (idempotent): an ONNX model becomes an
    architecture of space `onnx`; a LiteRT one, which the graph encoder does not read, an artifact only."""
    fmt = checked_format(data)
    sha256 = store.put(data)
    architecture_id = ensure_architecture(session, get_space(ONNX), sha256).id if fmt is ArtifactFormat.onnx else None
    artifact = session.get(Artifact, sha256)
    if artifact is None:
        artifact = Artifact(sha256=sha256, format=fmt.value, size_bytes=len(data), architecture_id=architecture_id)
        session.add(artifact)
    elif artifact.architecture_id is None:
        artifact.architecture_id = architecture_id
    session.flush()
    return artifact


def encoded(keys: list[str], field: str) -> list[str]:
    """The keys, each checked to be an uploaded model the graph encoder reads (422 naming the
    node it cannot read otherwise)."""
    space = get_space(ONNX)
    for i, key in enumerate(keys):
        try:
            space.canonical(key)
        except InvalidArchitecture as exc:
            raise Invalid(str(exc), f"{field}.{i}") from exc
    return keys


def create(session: Session, name: str, artifacts: list[str]) -> Collection:
    if session.scalar(select(Collection.id).where(Collection.name == name)) is not None:
        raise Conflict(f"a collection named {name!r} exists", "name")
    unique = list(dict.fromkeys(artifacts))
    known = set(session.scalars(select(Artifact.sha256).where(Artifact.sha256.in_(unique), Artifact.format == "onnx")))
    for i, sha256 in enumerate(unique):
        if sha256 not in known:
            raise NotFound(f"no uploaded ONNX model {sha256}: POST it to /api/v1/artifacts first", f"artifacts.{i}")
    encoded(unique, "artifacts")
    collection = Collection(name=name, members=[CollectionMember(artifact_sha256=sha256, position=position)
                                                for position, sha256 in enumerate(unique)])
    session.add(collection)
    session.flush()
    return collection


def get(session: Session, name: str, field: str = "collection") -> Collection:
    collection = session.scalar(select(Collection).where(Collection.name == name))
    if collection is None:
        raise NotFound(f"no collection {name!r}", field)
    return collection


def members(collection: Collection) -> list[str]:
    return [member.artifact_sha256 for member in collection.members]


def members_named(sessions: sessionmaker[Session], name: str) -> list[str]:
    with session_scope(sessions) as session:
        return members(get(session, name))
