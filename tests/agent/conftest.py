"""Fixtures of the agent's tests: a small ONNX model and a fake farm serving it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import FakeFarm, LocalServer, save_onnx_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32), "W")
    return save_onnx_model(
        tmp_path_factory.mktemp("model") / "conv_relu.onnx",
        [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32, 32])],
        initializers=[weight],
    )


@pytest.fixture
def farm(model_path: Path) -> Iterator[Callable[[], tuple[FakeFarm, LocalServer]]]:
    servers: list[LocalServer] = []

    def make() -> tuple[FakeFarm, LocalServer]:
        data = model_path.read_bytes()
        fake = FakeFarm({hashlib.sha256(data).hexdigest(): data})
        server = LocalServer(fake.handler())
        servers.append(server)
        return fake, server

    yield make
    for server in servers:
        server.close()
