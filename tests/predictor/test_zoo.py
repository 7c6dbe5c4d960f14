"""The model zoo's CNNs are the published architectures (torchvision's parameter counts and MACs),
export to ONNX, and the graph encoder reads each one (shape inference follows every node) into an
encoding of its own."""

from __future__ import annotations

import numpy as np
import pytest

from predictor.graph.encoding import FEATURE_DIM, encode_onnx
from predictor.graph.space import OnnxSpace
from predictor.graph.zoo import ZOO, ZooModel, zoo

#: torchvision's documented parameter counts and GFLOPS (multiply-adds, 224x224) of its definitions
PUBLISHED = {
    "resnet18": (11_689_512, 1.81), "resnet34": (21_797_672, 3.66), "resnet50": (25_557_032, 4.09),
    "mobilenet_v2": (3_504_872, 0.30), "mobilenet_v3_small": (2_542_856, 0.06),
    "mobilenet_v3_large": (5_483_032, 0.22), "efficientnet_b0": (5_288_548, 0.39), "mnasnet1_0": (4_383_312, 0.31),
    "shufflenet_v2_x1_0": (2_278_604, 0.14), "squeezenet1_1": (1_235_496, 0.35),
    "regnet_x_400mf": (5_495_976, 0.41), "regnet_y_400mf": (4_344_144, 0.40),
}
MAC_FAMILIES = ("conv", "conv_pointwise", "conv_depthwise", "matmul")


def test_the_zoo_has_the_published_parameter_counts() -> None:
    assert set(ZOO) == set(PUBLISHED) and len(ZOO) >= 10
    for name in ZOO:
        params = sum(p.numel() for p in ZooModel(name, 224).build().parameters())
        assert params == PUBLISHED[name][0], name


def test_every_model_exports_and_is_encoded_apart() -> None:
    space = OnnxSpace()
    vectors = {}
    # every model at 224, two at the smaller size too (an export costs about a second)
    for model in [*zoo(resolutions=(224,)), ZooModel("resnet18", 160), ZooModel("mobilenet_v3_small", 160)]:
        data = model.export()
        encoding = encode_onnx(data)
        assert encoding.vector.shape == (FEATURE_DIM,) and np.isfinite(encoding.vector).all(), model.label
        macs = sum(node.macs for node in encoding.nodes if node.family in MAC_FAMILIES)
        expected = PUBLISHED[model.name][1] * 1e9 * (model.resolution / 224) ** 2
        # the published figures have two decimals; a smaller input scales the MACs with its area
        assert macs == pytest.approx(expected, rel=0.1, abs=0.006e9), model.label
        assert space.add(data) == encoding.sha256
        vectors[model.label] = encoding.vector
    distinct = {vector.tobytes() for vector in vectors.values()}
    assert len(distinct) == len(vectors) == len(ZOO) + 2
    assert space.size() == len(vectors)
    assert ZooModel("squeezenet1_1", 160).export() == ZooModel("squeezenet1_1", 160).export()  # content-addressed
