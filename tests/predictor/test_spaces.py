"""The search spaces: keys, sampling, encodings, networks and their ONNX export."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from predictor.datasets import find_datasets
from predictor.spaces import (
    InvalidArchitecture,
    SearchSpace,
    UnknownSpace,
    get_space,
    load_spaces,
    reference_spaces,
    space_names,
)
from tests.helpers import CHAIN_SPACE_PACKAGE, NB201_KEY, REPO, write_dist_info

DATASETS = find_datasets()

FBNET_KEY = "|".join(["k3_e1", "k3_e1_g2", "k5_e6", "skip", "k5_e1_g2", "k3_e3"] * 3
                    + ["skip", "k3_e6", "k5_e3", "skip"])
OFA_ARCH: dict[str, Any] = {"ks": [3, 5, 7, 3] * 5, "e": [3, 4, 6, 4] * 5, "d": [2, 3, 4, 2, 3], "r": 128}
OFA_KEY = json.dumps(OFA_ARCH, sort_keys=True, separators=(",", ":"))
KEYS = {"nb201": NB201_KEY, "fbnet": FBNET_KEY, "ofa": OFA_KEY}
BUILT_IN_SPACES = tuple(KEYS)
N_CLASSES = {"nb201": 10, "fbnet": 1000, "ofa": 1000}


def dataset(name: str) -> Path:
    return DATASETS / name


def read_csv(name: str) -> list[dict[str, str]]:
    with open(dataset(name), newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(params=BUILT_IN_SPACES)
def space(request: pytest.FixtureRequest) -> SearchSpace:
    return get_space(request.param)


# --- registry -------------------------------------------------------------------------------

def test_registry_returns_singletons_and_rejects_unknown_names() -> None:
    # latfarm's own spaces register through the entry-point group like any package's
    assert {"nb201", "fbnet", "ofa", "onnx"} <= set(space_names())
    assert {space.name for space in reference_spaces()} >= set(BUILT_IN_SPACES)
    assert "onnx" not in {space.name for space in reference_spaces()}  # no table, no builder
    assert all(get_space(name) is get_space(name) and get_space(name).name == name for name in space_names())
    with pytest.raises(UnknownSpace, match="fbnet, nb201, ofa, onnx"):
        get_space("darts")
    assert issubclass(UnknownSpace, ValueError)


def test_an_installed_space_is_found_and_a_broken_one_is_reported_not_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `pip install` of a space package leaves on sys.path: a dist-info naming the entry point."""
    write_dist_info(tmp_path, "latfarm-chain-space", {"chain": "latfarm_chain_space:ChainSpace"})
    write_dist_info(tmp_path, "broken-space", {"broken": "no_such_module_here:Space", "misnamed": "os.path:join"})
    monkeypatch.syspath_prepend(str(CHAIN_SPACE_PACKAGE))
    monkeypatch.syspath_prepend(str(tmp_path))
    spaces, failures = load_spaces()
    assert {"chain", "nb201", "fbnet", "ofa", "onnx"} <= set(spaces)
    chain = spaces["chain"]
    assert chain.name == "chain" and chain.graph_encoded and not chain.has_reference_tables
    assert set(failures) == {"broken", "misnamed"}
    assert "broken-space 0.1.0" in failures["broken"] and "ModuleNotFoundError" in failures["broken"]
    assert "is not a predictor.spaces.SearchSpace" in failures["misnamed"]


def test_the_example_third_party_space_keys_features_and_export(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    from predictor.export import export_onnx
    from predictor.graph.encoding import FEATURE_DIM, encode_onnx

    monkeypatch.syspath_prepend(str(CHAIN_SPACE_PACKAGE))
    from latfarm_chain_space import ChainSpace

    space = ChainSpace()
    keys = list(space.enumerate())
    assert len(keys) == len(set(keys)) == space.size() == 6**3 and space.is_bounded()
    assert all(space.canonical(key) == key for key in keys[::17])
    sample = space.sample(5, seed=1)
    assert sample == space.sample(5, seed=1) and set(sample) <= set(keys) and len(set(sample)) == 5
    for bad in ("k3_w16-k3_w16", "k3_w16-k3_w16-k7_w16", "k3_w16-k3_w16-k3_w16-k3_w16", 7):
        with pytest.raises(InvalidArchitecture):
            space.canonical(bad)  # type: ignore[arg-type]
    small, large = "k3_w16-k3_w16-k3_w16", "k5_w64-k5_w64-k5_w64"
    features = space.features([small, large])
    assert features.shape == (2, FEATURE_DIM) == (2, space.feature_dim)
    # the features are the encoding of the very model the farm exports and measures
    data = export_onnx(space, large)
    np.testing.assert_array_equal(features[1], encode_onnx(data).vector)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": np.zeros((1, *space.input_shape), dtype=np.float32)})
    assert logits.shape == (1, 10)
    chain_ops = ("input", *["k3_w16"] * 3, "output")
    assert space.graph(small).ops.tolist() == [space.op_names.index(name) for name in chain_ops]


# --- keys against the reference datasets ---------------------------------------------------

def test_nb201_keys_match_dataset() -> None:
    space = get_space("nb201")
    rows = read_csv("nb201_archs.csv")
    for row in rows:
        key = row["arch_str"]
        assert space.canonical(key) == key
        assert space.op_vec(key) == tuple(int(d) for d in row["op_vec"])
        assert space.from_op_vec(space.op_vec(key)) == key
        assert space.is_connected(key) == (row["connected"] == "True")
    listed = list(space.enumerate())
    assert len(listed) == len(set(listed)) == space.size() == 15625
    assert set(listed) == {row["arch_str"] for row in rows}


def test_fbnet_keys_match_dataset() -> None:
    space = get_space("fbnet")
    for row in read_csv("fbnet_archs.csv"):
        key = row["ops"]
        assert space.canonical(key) == key
        assert space.op_vec(key) == tuple(int(d) for d in row["op_vec"])
        assert space.from_op_vec(space.op_vec(key)) == key


def test_ofa_keys_match_dataset() -> None:
    space = get_space("ofa")
    with open(dataset("ofa_archs.jsonl")) as handle:
        for line in handle:
            record = json.loads(line)
            del record["ofa_idx"]
            key = space.canonical(json.dumps(record))
            assert key == json.dumps(record, sort_keys=True, separators=(",", ":"))
            assert space.canonical(key) == key
            assert space.input_shape_of(key) == (3, record["r"], record["r"])


def test_ofa_canonical_normalises_layout_and_keeps_inactive_blocks() -> None:
    space = get_space("ofa")
    loose = json.dumps({"r": OFA_ARCH["r"], "d": OFA_ARCH["d"], "e": OFA_ARCH["e"], "ks": OFA_ARCH["ks"]}, indent=2)
    assert space.canonical(loose) == OFA_KEY
    other_inactive = dict(OFA_ARCH, ks=[3, 5, 7, 7] + OFA_ARCH["ks"][4:])  # block 3 of stage 0 is inactive (d=2)
    assert space.canonical(json.dumps(other_inactive)) != OFA_KEY
    assert np.array_equal(space.features([json.dumps(other_inactive)]), space.features([OFA_KEY]))


# --- malformed keys ----------------------------------------------------------------------------

MALFORMED = [
    ("nb201", "", "3 nodes"),
    ("nb201", NB201_KEY + "+|none~0|", "3 nodes"),
    ("nb201", NB201_KEY.replace("nor_conv_3x3", "conv_5x5", 1), "unknown operation 'conv_5x5'"),
    ("nb201", NB201_KEY.replace("avg_pool_3x3~1", "avg_pool_3x3~0"), "must be 'op~1'"),
    ("nb201", NB201_KEY.replace("|+|nor_conv_3x3~0|avg_pool_3x3~1|", "|+|nor_conv_3x3~0|"), "2 input edge"),
    ("nb201", NB201_KEY.strip("|"), "must be written"),
    ("nb201", NB201_KEY.replace("~2", ""), "must be 'op~2'"),
    ("fbnet", FBNET_KEY + "|skip", "22 operations"),
    ("fbnet", FBNET_KEY.replace("k3_e6", "k7_e6"), "unknown operation 'k7_e6' in block 19"),
    ("fbnet", FBNET_KEY.replace("|", ","), "22 operations"),
    ("ofa", "not json", "not JSON"),
    ("ofa", "[1, 2]", "JSON object"),
    ("ofa", json.dumps({**OFA_ARCH, "ofa_idx": 3}), "unknown: ofa_idx"),
    ("ofa", json.dumps({k: v for k, v in OFA_ARCH.items() if k != "d"}), "missing: d"),
    ("ofa", json.dumps({**OFA_ARCH, "ks": [3] * 19}), "'ks' must be a list of 20"),
    ("ofa", json.dumps({**OFA_ARCH, "e": [3] * 19 + [5]}), "e[19] must be one of [3, 4, 6]"),
    ("ofa", json.dumps({**OFA_ARCH, "d": [2, 3, 4, 2, True]}), "d[4]"),
    ("ofa", json.dumps({**OFA_ARCH, "r": 130}), "'r' must be one of 128..224"),
    ("ofa", json.dumps({**OFA_ARCH, "r": 256}), "'r'"),
    ("ofa", OFA_KEY[:-1] + ',"r":132}', "appears twice"),
]


@pytest.mark.parametrize(("name", "key", "message"), MALFORMED)
def test_malformed_keys_are_rejected_with_a_reason(name: str, key: str, message: str) -> None:
    space = get_space(name)
    with pytest.raises(InvalidArchitecture, match=message.replace("[", r"\[").replace("]", r"\]")):
        space.canonical(key)
    assert not space.is_valid(key)


def test_valid_keys(space: SearchSpace) -> None:
    assert space.is_valid(KEYS[space.name])
    assert space.canonical(KEYS[space.name]) == KEYS[space.name]


# --- sampling ----------------------------------------------------------------------------------

def test_sample_is_reproducible_distinct_and_canonical(space: SearchSpace) -> None:
    keys = space.sample(200, seed=7)
    assert keys == space.sample(200, seed=7)
    assert keys != space.sample(200, seed=8)
    assert len(set(keys)) == 200
    assert all(space.canonical(key) == key for key in keys)
    assert space.sample(0, seed=7) == []
    with pytest.raises(ValueError):
        space.sample(-1, seed=7)


def test_nb201_sample_can_take_the_whole_space() -> None:
    space = get_space("nb201")
    assert set(space.sample(space.size(), seed=0)) == set(space.enumerate())
    with pytest.raises(ValueError):
        space.sample(space.size() + 1, seed=0)


def test_space_sizes() -> None:
    assert get_space("fbnet").size() == 9**22
    assert get_space("ofa").size() == 3**20 * 3**20 * 3**5 * 25
    with pytest.raises(NotImplementedError):
        next(get_space("fbnet").enumerate())


# --- encodings ---------------------------------------------------------------------------------

def check_graph_invariants(space: SearchSpace, key: str, n_nodes: int) -> np.ndarray:
    graph = space.graph(key)
    assert graph.ops.shape == (n_nodes,) and graph.ops.dtype == np.int64
    assert graph.adjacency.shape == (n_nodes, n_nodes) and graph.adjacency.dtype == np.float32
    assert np.array_equal(graph.adjacency, np.triu(graph.adjacency, k=1))
    assert space.op_names[graph.ops[0]] == "input" and space.op_names[graph.ops[-1]] == "output"
    assert graph.adjacency[:, 1:].sum(axis=0).min() >= 1  # every node but the input has a predecessor
    assert graph.adjacency[:-1].sum(axis=1).min() >= 1  # every node but the output has a successor
    return graph.ops


def test_nb201_graph() -> None:
    space = get_space("nb201")
    ops = check_graph_invariants(space, NB201_KEY, 8)
    names = [space.op_names[i] for i in ops]
    assert names == ["input", "nor_conv_3x3", "nor_conv_3x3", "avg_pool_3x3",
                     "skip_connect", "nor_conv_3x3", "skip_connect", "output"]
    expected = {(0, 1), (0, 2), (0, 4), (1, 3), (1, 5), (2, 6), (3, 6), (4, 7), (5, 7), (6, 7)}
    assert {tuple(e) for e in np.argwhere(space.graph(NB201_KEY).adjacency)} == expected


def test_chain_graphs() -> None:
    fbnet, ofa = get_space("fbnet"), get_space("ofa")
    ops = check_graph_invariants(fbnet, FBNET_KEY, 24)
    assert "|".join(fbnet.op_names[i] for i in ops[1:-1]) == FBNET_KEY
    ops = check_graph_invariants(ofa, OFA_KEY, 22)
    assert [ofa.op_names[i] for i in ops[1:5]] == ["k3_e3", "k5_e4", "skip", "skip"]  # d[0] = 2
    assert [ofa.op_names[i] for i in ops[17:21]] == ["k3_e3", "k5_e4", "k7_e6", "skip"]  # d[4] = 3
    assert np.array_equal(fbnet.graph(FBNET_KEY).adjacency, np.eye(24, k=1))


def test_features_shape_and_dtype(space: SearchSpace) -> None:
    keys = space.sample(5, seed=1)
    features = space.features(keys)
    assert features.shape == (5, space.feature_dim) and features.dtype == np.float32
    assert np.isfinite(features).all()
    assert space.features([]).shape == (0, space.feature_dim)
    assert len({row.tobytes() for row in features}) == 5


def test_nb201_features() -> None:
    space = get_space("nb201")
    features = space.features([NB201_KEY, "|none~0|+|none~0|skip_connect~1|+|none~0|none~1|none~2|"])
    assert features.shape == (2, 40)
    assert np.array_equal(features[0, :30].reshape(6, 5).argmax(axis=1), space.op_vec(NB201_KEY))
    assert features[0, -1] == 1 and features[1, -1] == 0  # connected
    assert features[1, 35:39].sum() == 0  # no live edges


def test_ofa_features() -> None:
    features = get_space("ofa").features([OFA_KEY])[0]
    blocks = features[:120].reshape(20, 6)
    assert blocks.sum(axis=1).tolist() == [2, 2, 0, 0, 2, 2, 2, 0, 2, 2, 2, 2, 2, 2, 0, 0, 2, 2, 2, 0]
    assert features[120:135].reshape(5, 3).argmax(axis=1).tolist() == [0, 1, 2, 0, 1]
    assert features[135] == 0  # r = 128


# --- networks and ONNX export --------------------------------------------------------------------

def test_build_and_forward(space: SearchSpace) -> None:
    import torch

    key = KEYS[space.name]
    model = space.build(key)
    assert not model.training
    with torch.no_grad():
        output = model(space.example_input(key, batch_size=2))
    assert output.shape == (2, N_CLASSES[space.name])


def onnx_outputs_match_torch(space: SearchSpace, key: str, data: bytes) -> None:
    import onnx
    import onnxruntime
    import torch

    model = onnx.load_from_string(data)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["output"]
    assert model.opset_import[0].version >= 17
    x = space.example_input(key)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = space.build(key)(x).numpy()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"input": x.numpy()})
    # Untrained NB201 cells can sum skip paths into large activations: compare relative to scale.
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("name", BUILT_IN_SPACES)
def test_export_runs_in_onnxruntime_and_is_deterministic(name: str) -> None:
    from predictor.export import export_onnx

    space, key = get_space(name), KEYS[name]
    data = export_onnx(space, key)
    assert export_onnx(space, key) == data
    onnx_outputs_match_torch(space, key, data)


@pytest.mark.parametrize("key", [
    "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",
    "|nor_conv_1x1~0|+|none~0|none~1|+|skip_connect~0|nor_conv_3x3~1|avg_pool_3x3~2|",
])
def test_nb201_export_with_none_edges(key: str) -> None:
    from predictor.export import export_onnx

    onnx_outputs_match_torch(get_space("nb201"), key, export_onnx(get_space("nb201"), key))


def test_export_is_identical_across_processes() -> None:
    from predictor.export import export_onnx

    script = (
        "import hashlib; from predictor.export import export_onnx; from predictor.spaces import get_space; "
        f"print(hashlib.sha256(export_onnx(get_space('nb201'), {NB201_KEY!r})).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(REPO)}
    child = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                           check=True)
    assert child.stdout.strip() == hashlib.sha256(export_onnx(get_space("nb201"), NB201_KEY)).hexdigest()


def test_export_leaves_torch_global_state_alone() -> None:
    import torch

    from predictor.export import export_onnx

    threads = torch.get_num_threads()
    torch.manual_seed(42)
    before = torch.rand(1)
    torch.manual_seed(42)
    export_onnx(get_space("nb201"), NB201_KEY)
    assert torch.equal(torch.rand(1), before)
    assert torch.get_num_threads() == threads



def test_exports_from_several_threads_at_once_all_succeed() -> None:
    """A server exports on its lease threads while other code of the same process (a benchmark,
    the graph encoder) exports too: torch's exporter state is process-global."""
    from concurrent.futures import ThreadPoolExecutor

    from predictor.export import export_onnx

    space = get_space("nb201")
    keys = [NB201_KEY, *space.sample(3, seed=5)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda key: export_onnx(space, key), keys))
    assert together == [export_onnx(space, key) for key in keys]

# --- one network, one key ------------------------------------------------------------------------


def test_nb201_network_key_drops_dead_edges_and_relabels_nodes() -> None:
    space = get_space("nb201")
    keys = list(space.enumerate())
    networks = {space.network_key(key) for key in keys}
    assert len(networks) == 8765  # 341 disconnected cells all build one network
    assert all(space.network_key(n) == n and n in set(keys) for n in list(networks)[:500])
    # a dead edge: node 1 feeds nothing that reaches the output (1->2 and 1->3 are none)
    dead = "|nor_conv_3x3~0|+|skip_connect~0|none~1|+|nor_conv_1x1~0|none~1|avg_pool_3x3~2|"
    live = "|none~0|+|skip_connect~0|none~1|+|nor_conv_1x1~0|none~1|avg_pool_3x3~2|"
    assert space.live_key(dead) == live != dead
    assert space.network_key(dead) == space.network_key(live)
    # nodes 1 and 2 swapped (no edge joins them): the same graph, relabelled
    cell = "|nor_conv_3x3~0|+|avg_pool_3x3~0|none~1|+|skip_connect~0|nor_conv_1x1~1|skip_connect~2|"
    swapped = "|avg_pool_3x3~0|+|nor_conv_3x3~0|none~1|+|skip_connect~0|skip_connect~1|nor_conv_1x1~2|"
    assert space.network_key(cell) == space.network_key(swapped)
    assert space.live_key(cell) == cell  # relabelling is not dead code
    # joined by an edge, the nodes are not interchangeable
    joined = cell.replace("none~1", "skip_connect~1")
    assert space.network_key(joined) != space.network_key(joined.replace("nor_conv_3x3~0|+|avg_pool_3x3~0",
                                                                       "avg_pool_3x3~0|+|nor_conv_3x3~0"))


def test_nb201_keys_of_one_network_export_the_same_model() -> None:
    from predictor.export import export_onnx

    space = get_space("nb201")
    dead = "|nor_conv_3x3~0|+|skip_connect~0|none~1|+|nor_conv_1x1~0|none~1|avg_pool_3x3~2|"
    assert export_onnx(space, dead) == export_onnx(space, space.live_key(dead))


def test_ofa_network_key_ignores_inactive_blocks_and_fbnet_keys_are_their_networks() -> None:
    ofa = get_space("ofa")
    other_inactive = dict(OFA_ARCH)
    other_inactive["ks"] = list(OFA_ARCH["ks"])
    arch = ofa.parse(OFA_KEY)
    inactive = [b for b in range(len(arch.ks)) if not arch.is_active(b)]
    assert inactive, "the example architecture has inactive blocks"
    other_inactive["ks"][inactive[0]] = 7 if arch.ks[inactive[0]] != 7 else 3
    other = ofa.canonical(json.dumps(other_inactive))
    assert other != OFA_KEY and ofa.network_key(other) == ofa.network_key(OFA_KEY)
    assert ofa.network_key(ofa.network_key(OFA_KEY)) == ofa.network_key(OFA_KEY)
    fbnet = get_space("fbnet")
    assert all(fbnet.network_key(key) == key for key in fbnet.sample(50, seed=0))
