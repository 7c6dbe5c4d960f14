"""OpenVINO: the ONNX artifact read by `Core.read_model` and compiled for the CPU under the latency
hint, with `threads` inference threads, one stream and fp32 inference; the compiled model's own values of these
(and its inference precision) are recorded. Inference is a synchronous `InferRequest.infer` on
inputs set once, as benchmark_app's `-api sync`. GPU and NPU plugins are not offered: each would
need its own agreement check against benchmark_app on such a device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np

from agent.runtimes.base import Execution, LoadSettings, concrete_shape, distribution_version, random_input

INSTALL = "'latfarm[agent-openvino]' (openvino)"
DEVICE = "CPU"


def installed_version() -> str | None:
    return distribution_version("openvino", "openvino")


class Backend:
    def __init__(self, settings: LoadSettings) -> None:
        import openvino as ov

        self._ov = ov
        self._settings = settings
        self.version = str(ov.get_version())
        self.execution: Execution = {}
        self.providers: list[str] = []
        self.inputs: dict[str, list[int]] = {}
        self.build_ms: float | None = None

    def load(self) -> None:
        core = self._ov.Core()
        model = core.read_model(self._settings.model_path)
        self._compiled = core.compile_model(model, DEVICE, {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": self._settings.threads,
            "NUM_STREAMS": 1,
            # the device is fp32: on CPUs with bf16 (AVX-512 BF16, AMX) OpenVINO would otherwise run bf16
            "INFERENCE_PRECISION_HINT": "f32",
        })
        self.providers = [DEVICE]
        self.execution = {
            "device": DEVICE,
            "performance_hint": str(self._compiled.get_property("PERFORMANCE_HINT")),
            "inference_threads": int(self._compiled.get_property("INFERENCE_NUM_THREADS")),
            "streams": int(self._compiled.get_property("NUM_STREAMS")),
            "inference_precision": self._compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
            "api": "sync",
        }

    def prepare(self, seed: int) -> Callable[[], object]:
        """Random inputs of the model's shapes (dynamic dims -> 1, i.e. batch 1)."""
        rng = np.random.default_rng(seed)
        request = self._compiled.create_infer_request()
        for port in self._compiled.inputs:
            partial = port.get_partial_shape()
            dims = [d.get_length() if d.is_static else None for d in partial]
            array = random_input(rng, concrete_shape(dims), port.get_element_type().to_dtype())
            request.set_tensor(port, self._ov.Tensor(array))
            self.inputs[port.get_any_name()] = list(array.shape)
        self._request = request
        infer = request.infer
        return lambda: infer(share_outputs=True)

    def running(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()
