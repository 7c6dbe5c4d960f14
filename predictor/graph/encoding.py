"""A fixed-length encoding of any ONNX model, read from its graph.

The graph's tensor shapes come from ONNX shape inference; per node the encoder works out the
op type, the output shape, the multiply-accumulates, the bytes of its weights (initializers it
reads) and of its output activation, and for convolutions kernel, stride and groups. Nodes are
pooled into a few physically meaningful op families (dense, pointwise and depthwise convolution,
matrix products, pooling, element-wise, normalisation, data movement, other): per family the
count, MACs, activation bytes and weight bytes, all on a log scale, plus histograms of layer
sizes (GPUs under-use small layers, so how the MACs are spread matters, not only their sum).
These are properties of the computation, not of a search space, so one predictor can learn
from NB201 cells, FBNet and OFA networks and uploaded models alike.

Models the encoder cannot read raise `UnparsableModel` naming the node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

#: op families of the pooled encoding, in feature order
FAMILIES = ("conv", "conv_pointwise", "conv_depthwise", "matmul", "pool", "activation", "arithmetic", "norm",
            "movement", "other")
_ACTIVATIONS = {"Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Gelu",
                "Softplus", "Softmax", "LogSoftmax", "Clip", "Mish", "Erf", "Exp", "Log", "Sqrt", "Pow", "Neg"}
_ARITHMETIC = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less", "Greater"}
_POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "ReduceMean", "ReduceMax",
          "ReduceSum", "ReduceMin"}
_NORMS = {"BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
          "LpNormalization"}
_MOVEMENT = {"Reshape", "Transpose", "Flatten", "Concat", "Split", "Slice", "Gather", "Squeeze", "Unsqueeze", "Pad",
             "Resize", "Upsample", "Expand", "Tile", "Shape", "Cast", "Identity", "Constant", "DepthToSpace",
             "SpaceToDepth", "Dropout"}
#: ops that cost nothing at run time once the graph is loaded
_FREE = {"Identity", "Constant", "Shape", "Dropout"}
#: layer-size histograms: log10 MACs of each convolution/matmul, log10 bytes of each activation
MAC_BINS = np.arange(3.0, 10.0, 1.0)
BYTE_BINS = np.arange(3.0, 8.5, 0.75)
KERNELS = (1, 3, 5, 7)
_DTYPE_BYTES: dict[int, int] = {
    TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.DOUBLE: 8, TensorProto.INT8: 1,
    TensorProto.UINT8: 1, TensorProto.INT32: 4, TensorProto.INT64: 8, TensorProto.BOOL: 1, TensorProto.INT16: 2,
}

#: the whole-model summaries at the end of the vector: what a few samples can fit a ridge on
SUMMARY_NAMES = ("log_macs", "log_weight_bytes", "log_activation_bytes", "log_nodes", "depthwise_mac_share",
                 "log_input_bytes")
FEATURE_NAMES: tuple[str, ...] = (
    *(f"{family}_{what}" for family in FAMILIES for what in ("count", "macs", "activation_bytes", "weight_bytes")),
    *(f"conv_macs_k{k}" for k in KERNELS), "strided_conv_count", "log_depth", "log_max_activation_bytes",
    *(f"mac_hist_{b}" for b in range(len(MAC_BINS) + 1)), *(f"byte_hist_{b}" for b in range(len(BYTE_BINS) + 1)),
    *SUMMARY_NAMES,
)
FEATURE_DIM = len(FEATURE_NAMES)


class UnparsableModel(ValueError):
    """An ONNX model the encoder cannot read; `node` names the node at fault (None: the model as a whole)."""

    def __init__(self, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


@dataclass(frozen=True)
class NodeCost:
    """What one node computes and moves."""

    name: str
    op_type: str
    family: str
    output_shape: tuple[int, ...]
    macs: int
    activation_bytes: int
    weight_bytes: int
    kernel: int | None = None
    stride: int | None = None
    groups: int | None = None


@dataclass(frozen=True)
class GraphEncoding:
    sha256: str
    nodes: tuple[NodeCost, ...]
    input_bytes: int
    depth: int
    vector: np.ndarray  # (FEATURE_DIM,) float32

    @property
    def macs(self) -> int:
        return sum(node.macs for node in self.nodes)

    @property
    def weight_bytes(self) -> int:
        return sum(node.weight_bytes for node in self.nodes)

    @property
    def activation_bytes(self) -> int:
        return sum(node.activation_bytes for node in self.nodes)


def model_sha256(data: bytes) -> str:
    """The key of a model in the `onnx` space: the sha256 of its bytes as uploaded (artifacts
    are stored under the same hash)."""
    return hashlib.sha256(data).hexdigest()


def encode_onnx(data: bytes) -> GraphEncoding:
    """The encoding of a serialised ONNX model; raises UnparsableModel."""
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises several unrelated types for malformed bytes
        raise UnparsableModel(f"not an ONNX model: {exc}") from exc
    return encode_model(model, model_sha256(data))


def encode_model(model: onnx.ModelProto, sha256: str) -> GraphEncoding:
    graph = model.graph
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError, ValidationError, RuntimeError...
        raise UnparsableModel(f"shape inference failed: {exc}", _node_named_in(str(exc), graph.node)) from exc
    shapes: dict[str, tuple[tuple[int, ...], int]] = {}
    for info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        known = _static_shape(info)
        if known is not None:
            shapes[info.name] = known
    weights = {init.name: init for init in graph.initializer}
    for init in graph.initializer:
        shapes[init.name] = (tuple(init.dims), _DTYPE_BYTES.get(init.data_type, 4))
    for node in graph.node:  # Constant nodes are weights too
        if node.op_type == "Constant" and node.attribute:
            try:
                value = numpy_helper.to_array(helper.get_attribute_value(node.attribute[0]))
            except Exception:
                continue
            shapes[node.output[0]] = (tuple(value.shape), value.dtype.itemsize)
    graph_inputs = [i for i in graph.input if i.name not in weights]
    if not graph_inputs:
        raise UnparsableModel("the model has no input")
    input_bytes = 0
    for info in graph_inputs:
        if info.name not in shapes:
            raise UnparsableModel(f"input {info.name!r} has no static shape (set every dimension, batch included)",
                                  info.name)
        shape, size = shapes[info.name]
        input_bytes += int(np.prod(shape, dtype=np.int64)) * size
    nodes = tuple(_node_cost(node, index, shapes, weights) for index, node in enumerate(graph.node))
    depth = _depth(graph)
    return GraphEncoding(sha256, nodes, input_bytes, depth, _pool(nodes, input_bytes, depth))


def _node_named_in(message: str, nodes: Sequence[onnx.NodeProto]) -> str | None:
    for node in nodes:
        if node.name and node.name in message:
            return node.name
    return None


def _static_shape(info: onnx.ValueInfoProto) -> tuple[tuple[int, ...], int] | None:
    tensor = info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    dims = []
    for dim in tensor.shape.dim:
        if not dim.HasField("dim_value") or dim.dim_value <= 0:
            return None
        dims.append(dim.dim_value)
    return tuple(dims), _DTYPE_BYTES.get(tensor.elem_type, 4)


def _family(node: onnx.NodeProto, groups: int, kernel: int, in_channels: int) -> str:
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        if groups > 1 and groups == in_channels:
            return "conv_depthwise"
        return "conv_pointwise" if kernel == 1 else "conv"
    if op in ("MatMul", "Gemm", "Einsum"):
        return "matmul"
    for family, ops in (("pool", _POOLS), ("activation", _ACTIVATIONS), ("arithmetic", _ARITHMETIC),
                        ("norm", _NORMS), ("movement", _MOVEMENT)):
        if op in ops:
            return family
    return "other"


def _node_cost(node: onnx.NodeProto, index: int, shapes: dict[str, tuple[tuple[int, ...], int]],
               weights: dict[str, onnx.TensorProto]) -> NodeCost:
    name = node.name or f"{node.op_type}_{index}"
    outputs = [out for out in node.output if out]
    if not outputs:
        raise UnparsableModel(f"node {name!r} ({node.op_type}) has no output", name)
    if outputs[0] not in shapes:
        raise UnparsableModel(f"node {name!r} ({node.op_type}): the shape of its output {outputs[0]!r} could not "
                              "be inferred (an unknown op, or a dynamic dimension)", name)
    out_shape, out_size = shapes[outputs[0]]
    out_elems = int(np.prod(out_shape, dtype=np.int64))
    inputs = [shapes.get(i, ((), 4))[0] for i in node.input if i]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    weight_bytes = sum(int(np.prod(weights[i].dims, dtype=np.int64)) * _DTYPE_BYTES.get(weights[i].data_type, 4)
                       for i in node.input if i in weights)
    kernel = stride = groups = None
    in_channels = inputs[0][1] if inputs and len(inputs[0]) > 1 else 0
    macs = 0
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        if len(inputs) < 2 or len(inputs[1]) < 3:
            raise UnparsableModel(f"node {name!r} ({op}): its weight shape is unknown", name)
        w = inputs[1]
        groups = int(attrs.get("group", 1))
        kernel_dims = w[2:]
        kernel = int(max(kernel_dims))
        stride = int(max(attrs.get("strides", [1])))
        spatial = int(np.prod(kernel_dims, dtype=np.int64))
        if op == "Conv":
            macs = out_elems * w[1] * spatial
        else:  # ConvTranspose: every input element scatters over a kernel window
            macs = int(np.prod(inputs[0], dtype=np.int64)) * w[1] * spatial
    elif op in ("MatMul", "Gemm"):
        if len(inputs) < 2 or not inputs[0]:
            raise UnparsableModel(f"node {name!r} ({op}): its operand shapes are unknown", name)
        a = inputs[0]
        reduce_dim = a[0] if op == "Gemm" and attrs.get("transA", 0) else a[-1]
        macs = out_elems * reduce_dim
    elif op in _POOLS:
        window = attrs.get("kernel_shape")
        if window is not None:
            kernel, stride = int(max(window)), int(max(attrs.get("strides", [1])))
            macs = out_elems * int(np.prod(window, dtype=np.int64))
        else:  # global pooling and reductions read their whole input
            macs = int(np.prod(inputs[0], dtype=np.int64)) if inputs else out_elems
    elif op not in _FREE:
        macs = out_elems  # element-wise and data movement: one operation per output element
    family = _family(node, groups or 1, kernel or 0, in_channels)
    activation_bytes = 0 if op in _FREE else out_elems * out_size
    return NodeCost(name, op, family, tuple(out_shape), int(macs), int(activation_bytes), int(weight_bytes),
                    kernel, stride, groups)


def _depth(graph: onnx.GraphProto) -> int:
    """Nodes on the longest path (ONNX lists nodes in topological order)."""
    level: dict[str, int] = {}
    deepest = 0
    for node in graph.node:
        d = 1 + max((level.get(i, 0) for i in node.input if i), default=0)
        for out in node.output:
            level[out] = d
        deepest = max(deepest, d)
    return deepest


def _log(value: float) -> float:
    return float(np.log1p(max(value, 0.0)))


def _pool(nodes: Sequence[NodeCost], input_bytes: int, depth: int) -> np.ndarray:
    out: list[float] = []
    for family in FAMILIES:
        members = [n for n in nodes if n.family == family and n.op_type not in _FREE]
        out += [_log(len(members)), _log(sum(n.macs for n in members)),
                _log(sum(n.activation_bytes for n in members)), _log(sum(n.weight_bytes for n in members))]
    convs = [n for n in nodes if n.kernel is not None and n.family.startswith("conv")]
    out += [_log(sum(n.macs for n in convs if n.kernel == k)) for k in KERNELS]
    out.append(_log(sum(1 for n in convs if (n.stride or 1) > 1)))
    out.append(_log(depth))
    out.append(_log(max((n.activation_bytes for n in nodes), default=0)))
    heavy = [n.macs for n in nodes if n.family in ("conv", "conv_pointwise", "conv_depthwise", "matmul") and n.macs]
    out += _log_histogram(heavy, MAC_BINS)
    out += _log_histogram([n.activation_bytes for n in nodes if n.activation_bytes], BYTE_BINS)
    macs = sum(n.macs for n in nodes)
    depthwise = sum(n.macs for n in nodes if n.family == "conv_depthwise")
    out += [_log(macs), _log(sum(n.weight_bytes for n in nodes)), _log(sum(n.activation_bytes for n in nodes)),
            _log(sum(1 for n in nodes if n.op_type not in _FREE)), depthwise / macs if macs else 0.0,
            _log(input_bytes)]
    return np.asarray(out, dtype=np.float32)


def _log_histogram(values: Sequence[int], bins: np.ndarray) -> list[float]:
    """log1p of how many values fall in each log10 bin (below the first, between, above the last)."""
    counts = np.bincount(np.digitize(np.log10(np.asarray(values, dtype=np.float64)), bins),
                         minlength=len(bins) + 1) if len(values) else np.zeros(len(bins) + 1)
    return [float(np.log1p(c)) for c in counts]
