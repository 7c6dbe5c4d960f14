"""PyTorch: a `torch.export` program (saved with `torch.export.save`) run as `program.module()`
under `torch.inference_mode()`, with `threads` intra-op threads and one inter-op thread."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from agent.runtimes.base import Execution, LoadSettings, distribution_version

if TYPE_CHECKING:
    import torch

INSTALL = "torch"


def installed_version() -> str | None:
    return distribution_version("torch", "torch")


class _TensorSpec(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype


class Backend:
    def __init__(self, settings: LoadSettings) -> None:
        import torch
        import torch.utils._pytree as pytree

        torch.set_num_threads(settings.threads)  # before anything runs: the pools are fixed afterwards
        torch.set_num_interop_threads(1)
        self._torch = torch
        self._pytree = pytree
        self._settings = settings
        self.version = str(torch.__version__)
        self.execution: Execution = {
            "intra_op_threads": torch.get_num_threads(),
            "inter_op_threads": torch.get_num_interop_threads(),
            "inference_mode": True,
        }
        self.providers: list[str] = []
        self.inputs: dict[str, list[int]] = {}
        self.build_ms: float | None = None

    def load(self) -> None:
        self._program = self._torch.export.load(self._settings.model_path)
        self._module = self._program.module()

    def prepare(self, seed: int) -> Callable[[], object]:
        """Random inputs shaped like the program's example inputs, or, where it has none, like its
        input placeholders (symbolic dims -> their lower bound, at least 1)."""
        generator = self._torch.Generator().manual_seed(seed)
        leaves, spec = self._input_leaves()
        names = list(self._program.graph_signature.user_inputs)
        if len(names) != len(leaves):
            names = [f"input{i}" for i in range(len(leaves))]
        values: list[object] = []
        for name, leaf in zip(names, leaves):
            if isinstance(leaf, _TensorSpec):
                tensor = self._random(leaf, generator)
                self.inputs[name] = list(tensor.shape)
                leaf = tensor
            values.append(leaf)
        args, kwargs = self._pytree.tree_unflatten(values, spec)
        module = self._module
        return lambda: module(*args, **kwargs)

    def _input_leaves(self) -> tuple[list[object], Any]:
        """The flattened inputs, tensors as their _TensorSpec, and the spec to rebuild (args, kwargs)."""
        torch = self._torch
        program = self._program
        example = getattr(program, "example_inputs", None)
        if example is not None:
            flat, spec = self._pytree.tree_flatten(example)
            return [_TensorSpec(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x for x in flat], spec
        user_inputs = set(program.graph_signature.user_inputs)
        leaves: list[object] = []
        for node in program.graph.nodes:
            if node.op != "placeholder" or node.name not in user_inputs:
                continue
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise TypeError(f"cannot make an input for {node.name!r}: no example and no tensor metadata")
            leaves.append(_TensorSpec(tuple(self._concrete(d) for d in val.shape), val.dtype))
        return leaves, program.call_spec.in_spec

    def _concrete(self, dim: int | torch.SymInt) -> int:
        if isinstance(dim, int):
            return dim
        bounds = self._program.range_constraints.get(dim.node.expr)
        return max(1, int(bounds.lower)) if bounds is not None else 1

    def _random(self, spec: _TensorSpec, generator: torch.Generator) -> torch.Tensor:
        torch = self._torch
        if spec.dtype.is_floating_point or spec.dtype.is_complex:
            return torch.randn(spec.shape, dtype=spec.dtype, generator=generator)
        return torch.randint(0, 2, spec.shape, generator=generator).to(spec.dtype)

    def running(self) -> contextlib.AbstractContextManager[object]:
        return self._torch.inference_mode()
