"""LiteRT (TensorFlow Lite): a `.tflite` flatbuffer in the LiteRT interpreter with `threads`
threads. The interpreter applies the XNNPACK delegate by default on CPU (as LiteRT does on a
phone or a board), which is recorded as the delegate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np

from agent.runtimes.base import Execution, LoadSettings, distribution_version, random_input

INSTALL = "'latfarm[agent-litert]' (ai-edge-litert)"


def installed_version() -> str | None:
    return distribution_version("ai_edge_litert", "ai-edge-litert")


class Backend:
    def __init__(self, settings: LoadSettings) -> None:
        from ai_edge_litert import interpreter

        self._interpreter_module = interpreter
        self._settings = settings
        self.version = installed_version() or "unknown"
        self.execution: Execution = {}
        self.providers: list[str] = []
        self.inputs: dict[str, list[int]] = {}
        self.build_ms: float | None = None

    def load(self) -> None:
        module = self._interpreter_module
        resolver = module.OpResolverType.AUTO  # the built-in kernels with XNNPACK applied
        self._interpreter = module.Interpreter(
            model_path=self._settings.model_path, num_threads=self._settings.threads,
            experimental_op_resolver_type=resolver,
        )
        self._interpreter.allocate_tensors()
        self.providers = ["XNNPACK"]
        self.execution = {"num_threads": self._settings.threads, "delegate": "xnnpack",
                          "op_resolver": resolver.name.lower()}

    def prepare(self, seed: int) -> Callable[[], object]:
        """Random inputs of the model's input shapes (unknown dims -> 1, i.e. batch 1)."""
        rng = np.random.default_rng(seed)
        interpreter = self._interpreter
        for detail in interpreter.get_input_details():
            shape = [int(d) if d > 0 else 1 for d in detail["shape_signature"]]
            if list(detail["shape"]) != shape:
                interpreter.resize_tensor_input(detail["index"], shape)
                interpreter.allocate_tensors()
            interpreter.set_tensor(detail["index"], random_input(rng, shape, detail["dtype"]))
            self.inputs[detail["name"]] = shape
        return interpreter.invoke

    def running(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()
