"""The cross-space bench: how well the graph-level predictor transfers to a space it never saw.

Each space contributes a fixed sample of its published table's architectures, exported to ONNX
and encoded from the graph (`predictor.graph.exports`, cached, so a run resumes). Scenarios, per
held-out space H and each of H's devices D:

- `space_unseen`: pre-train the `onnx` predictor on the other spaces' reference tables (every
  device, D included where another space measured it), adapt it to D from k of H's samples.
- `both_unseen`: the same with D's column dropped from the other spaces' tables too.

Methods, all given the same k samples and scored on the rest of H's sample. The samples are the
ones a user's device gets: the default (design) sampler of the scenario's onnx predictor, from
the graphs alone; with fewer candidates than `predictor.samplers.DESIGN_POOL` every seed gets
the same picks. The methods:
`ours` (the graph-level predictor), `flops_ridge` (ridge on log MACs, weight bytes, activation
bytes of the k samples) and `in_space` (H's own predictor pre-trained on H's whole table for
H's other devices, in three folds of devices: the upper reference). Rows are appended to
`cross_space.csv` as they come; rows already there are not recomputed.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau, spearmanr

from predictor.bench.data import load_space_table, memoised_space
from predictor.bench.methods import ridge_fit_predict
from predictor.datasets import find_datasets, read_latencies
from predictor.graph.encoding import SUMMARY_NAMES
from predictor.graph.exports import encode_exports, table_sample
from predictor.graph.space import OnnxSpace
from predictor.model import LatencyPredictor, TrainConfig
from predictor.reference import Row
from predictor.samplers import get_sampler
from predictor.spaces import get_space, reference_spaces

RAW_FILE = "cross_space.csv"
REPORT_FILE = "cross_space.md"
COLUMNS = ("scenario", "held_out_space", "device", "method", "k", "seed", "spearman", "kendall", "mape")
SCENARIOS = ("space_unseen", "both_unseen")
METHODS = ("ours", "flops_ridge", "in_space")
HELD_OUT = ("fbnet", "nb201")
DEFAULT_KS = (5, 10, 20, 50)
DEFAULT_SEEDS = 3
#: architectures of each space's table exported and encoded (export costs 0.3-0.6 s each)
DEFAULT_ARCHS = 250
#: device folds of the in-space reference: each fold's devices are predicted by a predictor
#: pre-trained on the other folds' devices
IN_SPACE_FOLDS = 3
#: the onnx predictor's pre-training: no sampler validation (every method gets the same samples)
GRAPH_CONFIG = TrainConfig(sampler_folds=0)
IN_SPACE_CONFIG = TrainConfig(sampler_folds=0)
_COST_COLUMNS = [SUMMARY_NAMES.index(name) - len(SUMMARY_NAMES)
                 for name in ("log_macs", "log_weight_bytes", "log_activation_bytes")]
Progress = Callable[[str], None]


@dataclass
class SpacePool:
    """A space's encoded sample: key -> sha256, and per device the latency of each sampled key."""

    space: str
    keys: list[str]
    sha: dict[str, str]
    latencies: dict[str, dict[str, float]] = field(default_factory=dict)  # device -> key -> ms

    def rows(self, devices: Iterable[str] | None = None) -> list[Row]:
        chosen = self.latencies if devices is None else {d: self.latencies[d] for d in devices}
        return [(self.sha[key], device, ms) for device, per_key in chosen.items() for key, ms in per_key.items()]


def load_pool(root: Path, space_name: str, n: int, cache: Path, onnx_space: OnnxSpace,
              progress: Progress | None = None) -> SpacePool:
    space = get_space(space_name)
    keys = table_sample(root, space, n)
    exported = encode_exports(space, keys, cache,
                              None if progress is None else lambda d, t: progress(f"{space_name}: exported {d}/{t}"))
    for arch in exported.values():
        onnx_space.add_encoding(arch.sha256, arch.vector)
    index_of = {key: index for index, key in space.read_table_keys(root).items()}
    wanted = {index_of[key]: key for key in keys}
    latencies: dict[str, dict[str, float]] = {}
    for index, device, ms in read_latencies(root, space):
        if index in wanted:
            latencies.setdefault(device, {})[wanted[index]] = ms
    return SpacePool(space_name, keys, {key: arch.sha256 for key, arch in exported.items()}, latencies)


def score(predicted_ms: np.ndarray, measured_ms: np.ndarray) -> tuple[float, float, float]:
    """Spearman's rho, Kendall's tau and the mean absolute percentage error."""
    rho = float(spearmanr(predicted_ms, measured_ms).statistic)
    tau = float(kendalltau(predicted_ms, measured_ms).statistic)
    return rho, tau, float(np.mean(np.abs(predicted_ms / measured_ms - 1)) * 100)


def run_cross_space(out_dir: str | Path = "docs/bench", *, held_out: Sequence[str] = HELD_OUT,
                    scenarios: Sequence[str] = SCENARIOS, ks: Sequence[int] = DEFAULT_KS,
                    seeds: int = DEFAULT_SEEDS, archs_per_space: int = DEFAULT_ARCHS,
                    devices: Sequence[str] | None = None, cache: Path | None = None,
                    datasets: Path | None = None, progress: Progress | None = None) -> int:
    """Run (or resume) the bench; returns the number of rows written. `devices` limits the
    target devices (for a partial run)."""
    root = Path(datasets) if datasets is not None else find_datasets()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = cache or Path(".latfarm") / "graph_encodings.jsonl"
    bad = [s for s in held_out if s not in HELD_OUT] + [s for s in scenarios if s not in SCENARIOS]
    if bad:
        raise ValueError(f"unknown held-out space or scenario: {', '.join(bad)}")
    onnx_space = OnnxSpace()
    pools = {space.name: load_pool(root, space.name, archs_per_space, cache, onnx_space, progress)
             for space in reference_spaces()}
    done = _done(out / RAW_FILE)
    written = 0
    for target_space in held_out:
        pool = pools[target_space]
        others = [other for name, other in pools.items() if name != target_space]
        targets = [d for d in sorted(pool.latencies) if devices is None or d in devices]
        in_space = _InSpace(root, target_space, sorted(pool.latencies))
        bases: dict[str | None, LatencyPredictor] = {}
        for scenario in scenarios:
            for device in targets:
                cells = [(method, k, seed) for method in METHODS for k in ks for seed in range(seeds)
                         if (scenario, target_space, device, method, str(k), str(seed)) not in done]
                if not cells:
                    continue
                dropped = device if scenario == "both_unseen" else None
                if dropped not in bases:
                    if progress is not None:
                        progress(f"{target_space} held out: pre-training the onnx predictor"
                                 f"{'' if dropped is None else f' without {dropped}'}")
                    rows = [row for other in others for row in other.rows() if row[1] != dropped]
                    bases[dropped] = LatencyPredictor.pretrain(onnx_space, rows, config=GRAPH_CONFIG)
                base = bases[dropped]
                truth = pool.latencies[device]
                keys = [key for key in pool.keys if key in truth]
                rows_out = []
                key_of = {pool.sha[key]: key for key in keys}
                picks: dict[tuple[int, int], set[str]] = {}  # per (k, seed), the same for every method
                for method, k, seed in cells:
                    if (k, seed) not in picks:
                        # what a user's device gets: the base's default sampler (the design
                        # sampler: the onnx predictor validates none), from the keys' graphs only
                        picked = get_sampler("default").select(onnx_space, k, seed=seed, predictor=base,
                                                               candidates=list(key_of))
                        picks[(k, seed)] = {key_of[sha] for sha in picked}
                    chosen = picks[(k, seed)]
                    sampled = [key for key in keys if key in chosen]
                    rest = [key for key in keys if key not in chosen]
                    if method == "ours":
                        adapted = base.adapt({pool.sha[key]: truth[key] for key in sampled}, name=device)
                        predicted, _ = adapted.predict([pool.sha[key] for key in rest])
                    elif method == "flops_ridge":
                        costs = onnx_space.features([pool.sha[key] for key in keys])[:, _COST_COLUMNS]
                        row_of = {key: i for i, key in enumerate(keys)}
                        log_ms = ridge_fit_predict(costs[[row_of[k_] for k_ in sampled]],
                                                   np.log([truth[k_] for k_ in sampled]),
                                                   costs[[row_of[k_] for k_ in rest]])
                        predicted = np.exp(log_ms)
                    else:
                        predicted = in_space.predict(device, {key: truth[key] for key in sampled}, rest, seed)
                    rho, tau, mape = score(np.asarray(predicted), np.asarray([truth[key] for key in rest]))
                    rows_out.append((scenario, target_space, device, method, k, seed, f"{rho:.6f}", f"{tau:.6f}",
                                     f"{mape:.3f}"))
                _append(out / RAW_FILE, rows_out)
                written += len(rows_out)
                if progress is not None:
                    progress(f"{scenario} {target_space} {device}: {len(rows_out)} rows")
    write_report(out)
    return written


class _InSpace:
    """The held-out space's own predictor for each device, pre-trained on the space's whole table
    for the devices of the other folds (built when first asked)."""

    def __init__(self, root: Path, space_name: str, devices: list[str]) -> None:
        self.table = load_space_table(root, space_name)
        self.space = memoised_space(self.table.space, self.table.keys)
        order = np.random.default_rng(0).permutation(len(devices))
        self.fold_of = {devices[i]: position % IN_SPACE_FOLDS for position, i in enumerate(order)}
        self.models: dict[int, LatencyPredictor] = {}

    def predict(self, device: str, samples: dict[str, float], keys: list[str], seed: int) -> np.ndarray:
        fold = self.fold_of[device]
        if fold not in self.models:
            train = [d for d, f in self.fold_of.items() if f != fold]
            self.models[fold] = LatencyPredictor.pretrain(self.space, list(self.table.rows(train)),
                                                          config=IN_SPACE_CONFIG)
        # the tables timed each key as written, dead code included
        return self.models[fold].adapt(samples, name=device, per_network=None).predict(keys)[0]


def _done(path: Path) -> set[tuple[str, ...]]:
    if not path.exists():
        return set()
    with open(path, newline="") as handle:
        return {tuple(row[c] for c in COLUMNS[:6]) for row in csv.DictReader(handle)}


def _append(path: Path, rows: Sequence[tuple[object, ...]]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(COLUMNS)
        writer.writerows(rows)


def write_report(out_dir: str | Path) -> str:
    """cross_space.md from the raw rows: means per scenario, held-out space, method and k, and the
    acceptance check (space unseen, FBNet, k=20) per device."""
    out = Path(out_dir)
    with open(out / RAW_FILE, newline="") as handle:
        raw = list(csv.DictReader(handle))
    cells: dict[tuple[str, str, str, int], list[tuple[float, float, float]]] = {}
    per_device: dict[tuple[str, str, str, str, int], list[float]] = {}
    for row in raw:
        k = int(row["k"])
        values = (float(row["spearman"]), float(row["kendall"]), float(row["mape"]))
        cells.setdefault((row["scenario"], row["held_out_space"], row["method"], k), []).append(values)
        per_device.setdefault((row["scenario"], row["held_out_space"], row["device"], row["method"], k),
                              []).append(values[0])
    lines = ["# Cross-space bench", "",
             "Generated by `latfarm bench cross-space` from `cross_space.csv` (one row per scenario, held-out space, "
             "device, method, k and seed). Means over devices and seeds; rho = Spearman, tau = Kendall, "
             "MAPE in %. Each space contributes the same seeded sample of its published table (the "
             "`--archs-per-space` option), exported to ONNX and encoded from the graph; each method gets the same k "
             "samples of the target device (the scenario's onnx predictor's default sampler, the design sampler, picks "
             "them from the graphs alone: with fewer than 2,000 candidates every seed gets the same picks) and is "
             "scored on the rest of the sample. "
             "`rows` counts (device, seed) pairs: a partial run has fewer seeds or devices.", "",
             "| scenario | held out | method | k | devices | rows | rho | tau | MAPE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (scenario, space, method, k), cell in sorted(cells.items()):
        array = np.asarray(cell)
        devices = len({key[2] for key in per_device if key[:2] == (scenario, space) and key[3:] == (method, k)})
        lines.append(f"| {scenario} | {space} | {method} | {k} | {devices} | {len(array)} | {array[:, 0].mean():.3f} | "
                     f"{array[:, 1].mean():.3f} | {array[:, 2].mean():.1f} |")
    for scenario in SCENARIOS:
        for space in HELD_OUT:
            ours = {key[2]: float(np.mean(v)) for key, v in per_device.items()
                    if key[:2] == (scenario, space) and key[3:] == ("ours", 20)}
            ridge = {key[2]: float(np.mean(v)) for key, v in per_device.items()
                     if key[:2] == (scenario, space) and key[3:] == ("flops_ridge", 20)}
            both = sorted(set(ours) & set(ridge))
            if not both:
                continue
            beats = sum(ours[d] > ridge[d] for d in both)
            lines += ["", f"## {scenario}, {space} held out, k=20: per device", "",
                      f"ours mean rho {np.mean([ours[d] for d in both]):.3f} over {len(both)} devices; above "
                      f"flops_ridge on {beats} of {len(both)}.", "", "| device | ours | flops_ridge |", "|---|---|---|"]
            lines += [f"| {d} | {ours[d]:.3f} | {ridge[d]:.3f} |" for d in both]
    text = "\n".join(lines) + "\n"
    (out / REPORT_FILE).write_text(text)
    return text

