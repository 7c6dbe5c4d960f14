"""ONNX Runtime: an ONNX model in an InferenceSession on the requested execution provider, with
the CPU provider as fallback for the operators it lacks; sequential execution, all graph
optimisations, `threads` intra-op threads and one inter-op thread.

On a GPU host the CUDA and TensorRT execution providers run the same artifact. The TensorRT
provider builds its engine while the session is created and caches it in the agent's engine cache
(ONNX Runtime keys the file by the model and the GPU's compute capability; the folder is per
ONNX Runtime and TensorRT version): the creation of a session that built one is its
`build_ms` (reported as `engine_build_ms`, apart from the load).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.runtimes.base import (
    Execution,
    LoadSettings,
    RuntimeUnavailable,
    concrete_shape,
    distribution_version,
    random_input,
)

INSTALL = "'latfarm[agent]' (onnxruntime; onnxruntime-gpu for the CUDA and TensorRT providers)"
CPU_PROVIDER = "CPUExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"

_NUMPY_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16,
    "tensor(int32)": np.int32,
    "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def installed_version() -> str | None:
    for distribution in ("onnxruntime", "onnxruntime-gpu"):
        version = distribution_version("onnxruntime", distribution)
        if version not in (None, "unknown"):
            return version
    return distribution_version("onnxruntime", "onnxruntime")


def available_providers() -> list[str]:
    """ONNX Runtime's execution providers here; [] when it cannot be imported."""
    try:
        import onnxruntime as ort
    except Exception:  # noqa: BLE001 - a broken install must not stop the agent from reporting it
        return []
    return list(ort.get_available_providers())


class Backend:
    def __init__(self, settings: LoadSettings) -> None:
        import onnxruntime as ort

        self._ort = ort
        self._settings = settings
        self.version = str(ort.__version__)
        self.execution: Execution = {
            "intra_op_threads": settings.threads,
            "inter_op_threads": 1,
            "execution_mode": "sequential",
            "graph_optimization": "all",
        }
        self.providers: list[str] = []
        self.inputs: dict[str, list[int]] = {}
        self.build_ms: float | None = None

    def load(self) -> None:
        ort = self._ort
        requested = self._settings.provider or CPU_PROVIDER
        available = list(ort.get_available_providers())
        if requested not in available:
            raise RuntimeUnavailable(f"execution provider {requested} is not available here "
                                     f"(available: {', '.join(available)}); install {INSTALL}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._settings.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        providers: list[str | tuple[str, dict[str, str]]] = [CPU_PROVIDER]
        engine_cache: Path | None = None
        if requested == TENSORRT_PROVIDER:
            engine_cache = self._engine_cache()
            providers.insert(0, (requested, {"trt_engine_cache_enable": "True",
                                             "trt_engine_cache_path": str(engine_cache)}))
        elif requested != CPU_PROVIDER:
            providers.insert(0, requested)
        cached = _engine_files(engine_cache)
        started = time.perf_counter_ns()
        self._session = ort.InferenceSession(self._settings.model_path, sess_options=opts, providers=providers)
        if engine_cache is not None:
            built = _engine_files(engine_cache) - cached
            self.execution["engine_cache_hit"] = not built
            if built:  # the provider builds the engine while the session is created
                self.build_ms = (time.perf_counter_ns() - started) / 1e6
        self.providers = list(self._session.get_providers())

    def _engine_cache(self) -> Path:
        if self._settings.engine_cache_dir is None:
            raise RuntimeUnavailable("the TensorRT execution provider needs an engine cache folder")
        trt_version = distribution_version("tensorrt", "tensorrt") or "bundled"
        folder = Path(self._settings.engine_cache_dir) / f"ort-{self.version}-trt-{trt_version}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def prepare(self, seed: int) -> Callable[[], object]:
        """Random inputs of the declared shapes (symbolic/unknown dims -> 1, i.e. batch 1)."""
        rng = np.random.default_rng(seed)
        feeds: dict[str, np.ndarray] = {}
        for arg in self._session.get_inputs():
            dtype = _NUMPY_TYPES.get(arg.type)
            if dtype is None:
                raise TypeError(f"input {arg.name!r} has unsupported type {arg.type}")
            feeds[arg.name] = random_input(rng, concrete_shape(arg.shape), dtype)
        self.inputs = {name: list(array.shape) for name, array in feeds.items()}
        run = self._session.run
        return lambda: run(None, feeds)

    def running(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()


def _engine_files(folder: Path | None) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder is not None and folder.exists() else set()
