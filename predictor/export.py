"""ONNX and `torch.export` export of search-space architectures, byte-identical for a given key.

Artifacts are content-addressed (sha256 of the bytes), so the same key must always give the
same file: weights come from a fixed seed, and the TorchScript exporter writes nodes and
initializers in a deterministic order. Bytes can still differ between torch versions.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from predictor.spaces import SearchSpace

if TYPE_CHECKING:
    import torch

OPSET = 17
WEIGHT_SEED = 0
INPUT_NAME, OUTPUT_NAME = "input", "output"


def _seeded_model(space: SearchSpace, key: str) -> tuple[torch.nn.Module, torch.Tensor]:
    return seeded_module(lambda: space.build(key), space.input_shape_of(key))


def seeded_module(build: Callable[[], torch.nn.Module],
                  input_shape: tuple[int, ...]) -> tuple[torch.nn.Module, torch.Tensor]:
    """`build()` with weights drawn from the fixed seed, in eval mode, and a batch-1 example input."""
    import torch

    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(WEIGHT_SEED)
        model = build()
    return model.eval(), torch.zeros(1, *input_shape)


def export_onnx(space: SearchSpace, key: str) -> bytes:
    """The ONNX model of `key`: batch size 1, static shapes, input "input", output "output"."""
    key = space.canonical(key)
    return export_module_onnx(lambda: space.build(key), space.input_shape_of(key))


def export_module_onnx(build: Callable[[], torch.nn.Module], input_shape: tuple[int, ...]) -> bytes:
    """The ONNX model of the module `build()` makes (seeded weights) for a batch-1 input of `input_shape`."""
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings(), _single_threaded():
        model, example = seeded_module(build, input_shape)
        # The default, torch.export-based exporter needs onnxscript, which is not a dependency;
        # the deprecated TorchScript one needs nothing more and handles these plain CNNs well.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (example,), buffer,  # type: ignore[arg-type]  # the TorchScript exporter (dynamo=False) takes a file object too
            dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
        )
    return buffer.getvalue()


def export_torch(space: SearchSpace, key: str) -> bytes:
    """The `torch.export` program of `key` (batch size 1), as written by `torch.export.save`."""
    import torch

    buffer = io.BytesIO()
    with _single_threaded():
        model, example = _seeded_model(space, space.canonical(key))
        torch.export.save(torch.export.export(model, (example,)), buffer)
    return buffer.getvalue()


#: one export at a time per process: the weights come from torch's global random generator, the
#: TorchScript exporter keeps global state (two at once fail with "GLOBALS.in_onnx_export must be
#: False"), and the thread count is global too
_exporting = threading.Lock()


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Hold the export lock and run torch on one thread: export traces a batch-1 forward pass,
    which gains nothing from more threads, and on a busy machine their synchronisation made it up
    to 10x slower."""
    import torch

    with _exporting:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


class ExportUnavailable(RuntimeError):
    """The exporter for a format is not installed on this server."""


#: what to install on the server for the LiteRT export
LITERT_EXPORT_INSTALL = "pip install 'latfarm[server-litert]' (litert-torch)"


def litert_export_problem() -> str | None:
    """Why this server cannot export LiteRT artifacts, or None."""
    import importlib.util

    try:
        missing = importlib.util.find_spec("litert_torch") is None
    except ValueError:  # blocked with sys.modules["litert_torch"] = None
        missing = True
    if missing:
        return f"exporting LiteRT (.tflite) artifacts needs litert-torch on the server: {LITERT_EXPORT_INSTALL}"
    return None


def export_tflite(space: SearchSpace, key: str) -> bytes:
    """The LiteRT flatbuffer of `key` (batch size 1, the module's NCHW input), converted from the
    PyTorch module by litert-torch. Raises ExportUnavailable when litert-torch is not installed."""
    problem = litert_export_problem()
    if problem is not None:
        raise ExportUnavailable(problem)
    import litert_torch

    with warnings.catch_warnings(), _single_threaded():
        model, example = _seeded_model(space, space.canonical(key))
        warnings.simplefilter("ignore")
        converted = litert_torch.convert(model, (example,))
    return bytes(converted.model_content())
