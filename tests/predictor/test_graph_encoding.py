"""The graph encoder on real exports: its MAC count agrees with the spaces' analytic count, it is
a pure function of the bytes, and it names the node it cannot read."""

from __future__ import annotations

import numpy as np
import pytest

from predictor.cost import analytic_cost
from predictor.export import export_onnx
from predictor.graph.encoding import FEATURE_DIM, UnparsableModel, encode_onnx, model_sha256
from predictor.graph.space import OnnxSpace
from predictor.spaces import InvalidArchitecture, get_space
from tests.helpers import small_cnn, unparsable_model

MAC_FAMILIES = ("conv", "conv_pointwise", "conv_depthwise", "matmul")


@pytest.mark.parametrize("space_name", ["nb201", "fbnet"])
def test_conv_and_matmul_macs_match_the_analytic_count(space_name: str) -> None:
    space = get_space(space_name)
    keys = space.sample(2, seed=3)
    macs, _ = analytic_cost(space, keys)
    for key, expected in zip(keys, macs):
        encoding = encode_onnx(export_onnx(space, key))
        counted = sum(node.macs for node in encoding.nodes if node.family in MAC_FAMILIES)
        assert counted == expected, (key, counted, expected)
        assert encoding.vector.shape == (FEATURE_DIM,) and np.isfinite(encoding.vector).all()


def test_depthwise_convolutions_are_told_apart() -> None:
    space = get_space("fbnet")
    encoding = encode_onnx(export_onnx(space, space.sample(1, seed=0)[0]))
    depthwise = [node for node in encoding.nodes if node.family == "conv_depthwise"]
    assert depthwise and all(node.groups and node.groups > 1 for node in depthwise)
    assert {node.kernel for node in depthwise} <= {3, 5}
    assert any(node.stride == 2 for node in depthwise)


def test_the_key_is_the_sha256_and_bigger_models_encode_bigger() -> None:
    small, large = small_cnn(8, 1, 32, 0), small_cnn(32, 4, 64, 0)
    space = OnnxSpace()
    key = space.add(small)
    assert key == model_sha256(small) and space.canonical(key) == key
    big = encode_onnx(large)
    assert big.macs > 10 * encode_onnx(small).macs and big.activation_bytes > encode_onnx(small).activation_bytes
    np.testing.assert_array_equal(space.features([key])[0], encode_onnx(small).vector)


def test_a_model_it_cannot_read_names_the_node() -> None:
    with pytest.raises(UnparsableModel, match="mystery_node") as raised:
        encode_onnx(unparsable_model())
    assert raised.value.node == "mystery_node"
    with pytest.raises(UnparsableModel, match="not an ONNX model"):
        encode_onnx(b"not a model")
    space = OnnxSpace()
    data = unparsable_model()
    space.add_source(lambda sha: data if sha == model_sha256(data) else None)
    with pytest.raises(InvalidArchitecture, match="mystery_node"):
        space.canonical(model_sha256(data))
    with pytest.raises(InvalidArchitecture, match="was uploaded"):
        space.canonical("0" * 64)
