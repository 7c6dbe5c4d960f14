"""The `onnx` space's reference rows: the imported measurements of every built-in space, each
architecture seen through its ONNX export (`predictor.graph.exports`), keyed by its sha256."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import Session

from predictor.graph.exports import encode_exports, table_sample
from predictor.reference import Row
from predictor.spaces import BUILT_IN_SPACES, get_space
from server.services.datasets import iter_reference_rows
from server.settings import Settings

#: architectures of each space's table exported per pre-training (0.3-0.6 s each, cached)
DEFAULT_ARCHS_PER_SPACE = 300


def graph_reference_rows(session: Session, datasets: Path, cache: Path, devices: list[str] | None,
                         archs_per_space: int = DEFAULT_ARCHS_PER_SPACE,
                         progress: Callable[[int, int], None] | None = None) -> list[Row]:
    """(sha256, device, ms) rows of a sample of each built-in space's imported architectures."""
    onnx_space = get_space("onnx")
    rows: list[Row] = []
    for position, name in enumerate(BUILT_IN_SPACES):
        space = get_space(name)
        wanted = set(table_sample(datasets, space, archs_per_space))
        measured = [row for row in iter_reference_rows(session, space, devices) if row[0] in wanted]
        if not measured:
            continue
        report = None
        if progress is not None:
            def report(done: int, total: int, position: int = position) -> None:
                progress(position * total + done, len(BUILT_IN_SPACES) * total)
        exported = encode_exports(space, sorted({key for key, _, _ in measured}), cache, report)
        for arch in exported.values():
            onnx_space.add_encoding(arch.sha256, arch.vector)  # type: ignore[attr-defined]
        rows += [(exported[key].sha256, device, ms) for key, device, ms in measured]
    return rows


def row_source(settings: Settings, space: str, devices: list[str] | None,
               archs_per_space: int | None) -> Callable[[Session], list[Row]] | None:
    """What the `onnx` space pre-trains on (None for the built-in spaces: their own imports).
    The encodings are cached beside the artifacts, so a second pre-training exports nothing."""
    if space != "onnx":
        return None
    cache = settings.artifact_dir / "graph_encodings.jsonl"
    return lambda session: graph_reference_rows(session, settings.datasets, cache, devices,
                                                archs_per_space or DEFAULT_ARCHS_PER_SPACE)
