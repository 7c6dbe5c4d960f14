"""TensorRT: an engine built from the ONNX artifact for this host's first GPU, run with
`execute_async_v3` on one CUDA stream and timed to the stream's completion (cuda-python moves the
data). Building an engine takes seconds to minutes, so it is timed apart (`build_ms`, reported as
`engine_build_ms`) from the load, and cached in the agent's engine cache under a key of
(artifact sha256, GPU name, TensorRT version): a later measurement of the same artifact on the
same GPU and TensorRT only deserialises it. Threads do not apply.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.runtimes.base import Execution, LoadSettings, RuntimeUnavailable, distribution_version, random_input

INSTALL = "'latfarm[agent-tensorrt]' (tensorrt, cuda-python) on a host with an NVIDIA GPU"


def installed_version() -> str | None:
    return distribution_version("tensorrt", "tensorrt")


def engine_key(artifact_sha256: str, gpu_name: str, trt_version: str) -> str:
    """The engine cache's file name for an artifact built on a GPU model with a TensorRT version."""
    gpu = re.sub(r"[^A-Za-z0-9.]+", "-", gpu_name).strip("-") or "gpu"
    return f"{artifact_sha256}-{gpu}-trt{trt_version}.engine"


def _cuda_runtime() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as exc:
        raise RuntimeUnavailable(f"cuda-python is not installed ({exc}); install {INSTALL}") from exc
    return cudart


def _checked(result: tuple[Any, ...]) -> Any:
    """The value of a cuda-python call, which returns (error, value...)."""
    error, *values = result
    if int(error) != 0:
        raise RuntimeError(f"CUDA error {error}")
    return values[0] if len(values) == 1 else tuple(values)


class Backend:
    def __init__(self, settings: LoadSettings) -> None:
        cudart = _cuda_runtime()
        error, count = cudart.cudaGetDeviceCount()
        if int(error) != 0 or count == 0:
            raise RuntimeUnavailable(f"no CUDA GPU is visible here (cudaGetDeviceCount: {error}, {count} devices)")
        import tensorrt as trt

        self._cudart = cudart
        self._trt = trt
        self._settings = settings
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.version = str(trt.__version__)
        self.gpu = _checked(cudart.cudaGetDeviceProperties(0)).name.decode(errors="replace").strip("\0")
        self.build_ms: float | None = None
        self.execution: Execution = {"gpu": self.gpu}
        self.providers: list[str] = [self.gpu]
        self.inputs: dict[str, list[int]] = {}

    def load(self) -> None:
        if self._settings.engine_cache_dir is None:
            raise RuntimeUnavailable("TensorRT needs an engine cache folder")
        model = Path(self._settings.model_path).read_bytes()
        engine_path = Path(self._settings.engine_cache_dir) / engine_key(
            hashlib.sha256(model).hexdigest(), self.gpu, self.version)
        self.execution["engine_cache_hit"] = engine_path.exists()
        if not engine_path.exists():
            started = time.perf_counter_ns()
            plan = self._build(model)
            self.build_ms = (time.perf_counter_ns() - started) / 1e6
            engine_path.parent.mkdir(parents=True, exist_ok=True)
            temporary = engine_path.with_suffix(".partial")
            temporary.write_bytes(plan)
            temporary.replace(engine_path)
        runtime = self._trt.Runtime(self._logger)
        self._engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise RuntimeError(f"TensorRT could not deserialise the engine {engine_path.name}")
        self._context = self._engine.create_execution_context()

    def _build(self, model: bytes) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(model):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise NotImplementedError(f"TensorRT cannot parse the ONNX model: {errors}")
        plan = builder.build_serialized_network(network, builder.create_builder_config())
        if plan is None:
            raise RuntimeError("TensorRT failed to build an engine")
        return bytes(plan)

    def prepare(self, seed: int) -> Callable[[], object]:
        """Random inputs in device memory, outputs allocated beside them (static shapes)."""
        trt, cudart = self._trt, self._cudart
        rng = np.random.default_rng(seed)
        self._buffers: list[int] = []
        for index in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(index)
            shape = [max(1, int(d)) for d in self._engine.get_tensor_shape(name)]
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            size = int(np.prod(shape)) * dtype.itemsize
            pointer = int(_checked(cudart.cudaMalloc(size)))
            self._buffers.append(pointer)
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                host = np.ascontiguousarray(random_input(rng, shape, dtype))
                _checked(cudart.cudaMemcpy(pointer, host.ctypes.data, size,
                                           cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
                self.inputs[name] = shape
            self._context.set_tensor_address(name, pointer)
        stream = _checked(cudart.cudaStreamCreate())
        context, synchronize = self._context, cudart.cudaStreamSynchronize

        def run() -> None:
            context.execute_async_v3(int(stream))
            synchronize(stream)

        return run

    def running(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()
