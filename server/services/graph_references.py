"""What graph-encoded spaces (`onnx`, and installed spaces without reference tables of their own)
pre-train on: the imported measurements of every reference space, each architecture seen through
its ONNX export (`predictor.graph.exports`), keyed by its sha256 in the `onnx` space."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import Session

from predictor.graph.exports import encode_exports, table_sample
from predictor.reference import Row
from predictor.spaces import SearchSpace, get_space, reference_spaces
from server.services.datasets import iter_reference_rows
from server.settings import Settings

#: architectures of each space's table exported per pre-training (0.3-0.6 s each, cached)
DEFAULT_ARCHS_PER_SPACE = 300


def graph_reference_rows(session: Session, datasets: Path, cache: Path, devices: list[str] | None,
                         archs_per_space: int = DEFAULT_ARCHS_PER_SPACE,
                         progress: Callable[[int, int], None] | None = None) -> list[Row]:
    """(sha256, device, ms) rows of a sample of each reference space's imported architectures."""
    onnx_space = get_space("onnx")
    rows: list[Row] = []
    sources = reference_spaces()
    for position, space in enumerate(sources):
        wanted = set(table_sample(datasets, space, archs_per_space))
        measured = [row for row in iter_reference_rows(session, space, devices) if row[0] in wanted]
        if not measured:
            continue
        report = None
        if progress is not None:
            def report(done: int, total: int, position: int = position) -> None:
                progress(position * total + done, len(sources) * total)
        exported = encode_exports(space, sorted({key for key, _, _ in measured}), cache, report)
        for arch in exported.values():
            onnx_space.add_encoding(arch.sha256, arch.vector)
        rows += [(exported[key].sha256, device, ms) for key, device, ms in measured]
    return rows


def row_source(settings: Settings, space: SearchSpace, devices: list[str] | None,
               archs_per_space: int | None) -> Callable[[Session], list[Row]] | None:
    """What a graph-encoded space pre-trains on (None for the others: their own imports).
    The encodings are cached beside the artifacts, so a second pre-training exports nothing."""
    if not space.graph_encoded:
        return None
    cache = settings.artifact_dir / "graph_encodings.jsonl"
    return lambda session: graph_reference_rows(session, settings.datasets, cache, devices,
                                                archs_per_space or DEFAULT_ARCHS_PER_SPACE)
