"""A built-in space's own encoding against the graph encoding of its ONNX exports: which one lets
the pre-trained networks predict the reference devices' latency of architectures they never saw?

    python benchmarks/encodings.py                      # NB201, FBNet, OFA; 250 architectures each
    python benchmarks/encodings.py --space nb201 --archs 500

Each space contributes the cross-space bench's sample of its published table (`--archs`, the
same seeded draw, exported to ONNX and encoded from the graph; encodings cached in
`.latfarm/graph_encodings.jsonl`). In `--folds` folds of those architectures, a base predictor
is pre-trained on the space's devices' latencies of the other folds' architectures, once on the
space's own encoding (`SearchSpace.features`) and once on the graph encoding (the `onnx`
space), with the same configuration; each predicts every device's latency of the fold's
architectures, which its table does not hold, so the networks answer. Only the encoding differs.

Prints, per space and encoding, Spearman's rho (per device over the fold's architectures, then
the mean over devices and folds) and the mean absolute percentage error:

    encodings nb201 own: rho=X mape=Y
    encodings nb201 graph: rho=X mape=Y
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from predictor import LatencyPredictor, metrics
from predictor.datasets import find_datasets
from predictor.graph.bench import GRAPH_CONFIG, SpacePool, load_pool
from predictor.graph.space import OnnxSpace
from predictor.spaces import SearchSpace, get_space, reference_spaces


def fold_scores(pool: SpacePool, onnx_space: OnnxSpace, folds: int, seed: int) -> dict[str, list[tuple[float, float]]]:
    """Per encoding, (rho, MAPE) for every (fold, device)."""
    # each encoding's space, and how a table key is named in it
    encodings: dict[str, tuple[SearchSpace, Callable[[str], str]]] = {
        "own": (get_space(pool.space), lambda key: key), "graph": (onnx_space, pool.sha.__getitem__)}
    order = np.random.default_rng(seed).permutation(len(pool.keys))
    scores: dict[str, list[tuple[float, float]]] = {name: [] for name in encodings}
    for fold in np.array_split(order, folds):
        test = [pool.keys[i] for i in fold]
        tested = set(test)
        for name, (space, named) in encodings.items():
            rows = [(named(key), device, ms) for device, per_key in pool.latencies.items()
                    for key, ms in per_key.items() if key not in tested]
            base = LatencyPredictor.pretrain(space, rows, config=GRAPH_CONFIG)
            for device, truth in pool.latencies.items():
                held = [key for key in test if key in truth]
                if len(held) < 3:
                    continue
                predicted, _ = base.predict([named(key) for key in held], device=device)
                measured = np.asarray([truth[key] for key in held])
                scores[name].append((metrics.spearman(predicted, measured), metrics.mape(predicted, measured)))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tabled = [space.name for space in reference_spaces()]
    parser.add_argument("--space", nargs="+", choices=tabled, default=tabled)
    parser.add_argument("--archs", type=int, default=250, help="architectures of each space's table")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(".latfarm") / "graph_encodings.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = find_datasets()
    onnx_space = OnnxSpace()
    for name in args.space:
        pool = load_pool(root, name, args.archs, args.cache, onnx_space)
        for encoding, cells in fold_scores(pool, onnx_space, args.folds, args.seed).items():
            array = np.asarray(cells)
            print(f"encodings {name} {encoding}: rho={array[:, 0].mean():.3f} mape={array[:, 1].mean():.1f} "
                  f"(devices x folds: {len(array)})", flush=True)


if __name__ == "__main__":
    main()
