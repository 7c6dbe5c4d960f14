"""The `onnx` space: any ONNX model, keyed by the sha256 of its bytes, encoded from its graph.

Unlike the benchmark spaces it cannot list or build its members: it knows the models it has been
shown. `add(data)` encodes a model; a key it has not seen is looked up in its *sources* (callables
sha256 -> bytes or None, e.g. the server's artifact store) and encoded on first use. The
encodings are a cache of a pure function of the bytes, so sharing one instance is safe.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from predictor.graph.encoding import FAMILIES, FEATURE_DIM, SUMMARY_NAMES, UnparsableModel, encode_onnx
from predictor.spaces.base import ArchGraph, InvalidArchitecture, SearchSpace, check_sample_count

if TYPE_CHECKING:
    import torch

ModelSource = Callable[[str], "bytes | None"]
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class OnnxSpace(SearchSpace):
    """Any uploaded ONNX model, keyed by the sha256 of its bytes."""

    name = "onnx"
    op_names = ("input", *FAMILIES, "output")
    input_shape = (3, 224, 224)  # models bring their own input; this is only the usual one
    feature_dim = FEATURE_DIM
    #: every column but the whole-model summaries is a detail the adaptation does not regress on
    onehot_dim = FEATURE_DIM - len(SUMMARY_NAMES)
    key_format = "sha256 of an uploaded ONNX model's bytes (64 lowercase hex digits)"
    builds_networks = False
    graph_encoded = True

    def __init__(self) -> None:
        self._vectors: dict[str, np.ndarray] = {}
        self._graphs: dict[str, ArchGraph] = {}
        self._sources: list[ModelSource] = []
        self._lock = threading.Lock()

    # ---- what the space knows -----------------------------------------------------------------

    def add(self, data: bytes) -> str:
        """Encode a serialised model (raises UnparsableModel); returns its key."""
        encoding = encode_onnx(data)
        index = {family: i + 1 for i, family in enumerate(FAMILIES)}
        ops = np.array([0, *(index[node.family] for node in encoding.nodes), len(self.op_names) - 1], dtype=np.int64)
        with self._lock:
            self._vectors[encoding.sha256] = encoding.vector
            # the nodes in topological order as a chain: enough for op-sequence encoders
            self._graphs[encoding.sha256] = ArchGraph(ops, np.eye(len(ops), k=1, dtype=np.float32))
        return encoding.sha256

    def add_encoding(self, sha256: str, vector: np.ndarray) -> None:
        """A model encoded elsewhere (e.g. read back from a cache of exports)."""
        with self._lock:
            self._vectors[sha256] = np.asarray(vector, dtype=np.float32)

    def add_source(self, source: ModelSource) -> None:
        with self._lock:
            if source not in self._sources:
                self._sources.append(source)

    # ---- SearchSpace --------------------------------------------------------------------------

    def canonical(self, key: str) -> str:
        if not isinstance(key, str) or not _SHA256.match(key):
            raise InvalidArchitecture(f"{key!r} is not the sha256 of an ONNX model (64 lowercase hex digits)")
        if key in self._vectors:
            return key
        for source in list(self._sources):
            data = source(key)
            if data is not None:
                try:
                    self.add(data)
                except UnparsableModel as exc:
                    raise InvalidArchitecture(f"model {key} cannot be encoded: {exc}") from exc
                return key
        raise InvalidArchitecture(f"no ONNX model with sha256 {key} was uploaded")

    def network_key(self, key: str) -> str:
        """A model is its own network: the key needs no look-up (reference tables hold the keys of
        models this process may not have loaded)."""
        return key

    def live_key(self, key: str) -> str:
        return key

    def size(self) -> int:
        """The models encoded so far."""
        return len(self._vectors)

    def is_bounded(self) -> bool:
        return False

    def sample(self, n: int, seed: int) -> list[str]:
        known = sorted(self._vectors)
        check_sample_count(n, len(known))
        picks = np.random.default_rng(seed).choice(len(known), size=n, replace=False)
        return [known[i] for i in picks]

    def graph(self, key: str) -> ArchGraph:
        key = self.canonical(key)
        if key not in self._graphs:
            raise InvalidArchitecture(f"model {key} was added as an encoding only; its graph is not known")
        return self._graphs[key]

    def features(self, keys: Sequence[str]) -> np.ndarray:
        if len(keys) == 0:
            return np.zeros((0, FEATURE_DIM), dtype=np.float32)
        return np.stack([self._vectors[self.canonical(key)] for key in keys])

    def build(self, key: str) -> torch.nn.Module:
        raise NotImplementedError("an uploaded ONNX model is run as uploaded; it has no PyTorch builder")
