"""Spaces encoded from the graph of their ONNX exports, for spaces with no reference tables.

A space without published latency tables has nothing of its own to pre-train a predictor on.
What transfers to it from the reference spaces is what the graph encoding
(`predictor.graph.encoding`) describes, a property of the computation rather than of a space:
a `GraphEncodedSpace` gives each key the encoding of the ONNX model the farm exports and measures
for it (`predictor.export.export_onnx`, the same bytes), so the `onnx` space's base predictor,
pre-trained on the reference spaces' exports, serves it (`LatencyPredictor.serving`).

A subclass implements the rest of `SearchSpace` (keys, sampling, graph, `build`). Exporting
costs 0.05-0.5 s a key, so encodings are kept in memory, one per network.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from predictor.export import export_onnx
from predictor.graph.encoding import FEATURE_DIM, SUMMARY_NAMES, encode_onnx
from predictor.spaces.base import SearchSpace


class GraphEncodedSpace(SearchSpace):
    """A space whose `features` are the graph encoding of each key's ONNX export."""

    graph_encoded: ClassVar[bool] = True
    feature_dim = FEATURE_DIM
    #: as in the `onnx` space: the adaptation regresses on the whole-model summaries only
    onehot_dim = FEATURE_DIM - len(SUMMARY_NAMES)

    def __init__(self) -> None:
        self._encodings: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def features(self, keys: Sequence[str]) -> np.ndarray:
        if len(keys) == 0:
            return np.zeros((0, FEATURE_DIM), dtype=np.float32)
        return np.stack([self._encoding(self.network_key(key)) for key in keys])

    def _encoding(self, network: str) -> np.ndarray:
        with self._lock:
            found = self._encodings.get(network)
        if found is None:
            found = encode_onnx(export_onnx(self, network)).vector
            with self._lock:
                self._encodings[network] = found
        return found
