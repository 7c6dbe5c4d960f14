"""The leave-one-device-out bench: every NB201 and FBNet reference device in turn is the target.

For each target device, a base predictor is pre-trained on the other devices of its space;
the base's default sampler draws k samples from every architecture the target measured (the
whole space, as a user's device would be sampled), and each method predicts the rest. This is
the bench the predictor's settings are chosen on: only reference devices take part, never a
12-task test device. Rows go to `lodo.csv`, one per (space, reading, device, method, k, seed);
rows already there are not recomputed, so an interrupted run resumes.

Each target is read two ways where the space has keys that build one network (NB201):
- `as_timed`: the published table as its device timed it, every key as written (dead code and
  all). `ours` leaves it to the samples whether the device's dead code cost anything
  (`LatencyPredictor.adapt(per_network=None)`).
- `per_network`: the device as the farm would have measured it, each network once: every key
  gets its network's latency on the device (`MeasuredReference`: the mean over the keys
  building it, over those without dead code on a device that charges for it). `ours` reads it
  per network, as the farm reads its devices; the baselines read the reference devices per
  network too; the keys of a sampled network are measured, not held out.

With the tables covering every architecture, the adaptation reads every reference latency of
the held-out architectures from the table (`measured_share` is recorded: 1.0 means the network
was not consulted), so the fold bases are pre-trained with a small configuration: a longer
training changes no score of this bench.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from predictor import metrics
from predictor.datasets import find_datasets
from predictor.model import LatencyPredictor, TrainConfig
from predictor.reference import LatencyTable, MeasuredReference
from predictor.samplers import get_sampler
from predictor.spaces import SearchSpace

from .data import SpaceTable, load_space_table, memoised_space
from .methods import Method, TaskContext, get_methods
from .run import append_rows

RAW_FILE = "lodo.csv"
COLUMNS = ("space", "reading", "device", "method", "k", "seed", "spearman", "kendall", "mape", "within10", "coverage90",
           "calibration_rho", "measured_share")
SPACES = ("nb201", "fbnet")
KS = (5, 10, 20, 50)
SEEDS = 3
METHODS = ("ours", "one_proxy", "table_ridge", "flops")
#: how a target's latencies are read (see above); `per_network` only where keys share networks
READINGS = ("as_timed", "per_network")
CONFIG = TrainConfig(members=1, epochs=2, sampler_folds=0)
#: progress(done, total, description), counted in (device, k, seed) cells
Progress = Callable[[int, int, str], None]


@dataclass
class LodoResult:
    out_dir: Path
    rows_written: int
    devices: list[str]


def run_lodo(
    spaces: Sequence[str] = SPACES,
    devices: Sequence[str] | None = None,
    ks: Sequence[int] = KS,
    seeds: int = SEEDS,
    methods: Sequence[str] = METHODS,
    out_dir: str | Path = "docs/bench",
    *,
    datasets: Path | None = None,
    config: TrainConfig = CONFIG,
    progress: Progress | None = None,
    report: bool = True,
) -> LodoResult:
    """Run (or resume) the LODO bench over `spaces` (every device, or only `devices`)."""
    root = Path(datasets) if datasets is not None else find_datasets()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = _done(out / RAW_FILE)
    method_list = get_methods(list(methods))
    written, targets = 0, []
    plan = []
    for space_name in spaces:
        table = load_space_table(root, space_name)
        readings = READINGS if _shares_networks(table) else READINGS[:1]
        for device in sorted(table.latencies):
            if devices is not None and device not in devices:
                continue
            todo = [(reading, k, s) for reading in readings for k in ks for s in range(seeds)
                    if any((space_name, reading, device, m.name, k, s) not in done
                           for m in method_list if m.supports(space_name))]
            if todo:
                plan.append((space_name, device, todo))
    total = sum(len(todo) for *_, todo in plan)
    count = 0
    for space_name, device, todo in plan:
        table = load_space_table(root, space_name)
        space = memoised_space(table.space, table.keys)
        if progress is not None:
            progress(count, total, f"{space_name}: pre-training without {device}")
        base = fold_base(space, table, device, config)
        sampler = get_sampler("default")
        for reading in dict.fromkeys(reading for reading, _, _ in todo):
            context, truth = read_device(reading, space, table, device, base)
            keys = list(truth)
            for k, seed in [(k, seed) for r, k, seed in todo if r == reading]:
                picked = sampler.select(space, k, seed=seed, predictor=base, candidates=keys)
                held_out = held_out_keys(keys, picked, base.network_key if context.per_network else None)
                samples = {key: truth[key] for key in picked}
                measured = np.asarray([truth[key] for key in held_out])
                rows = []
                for method in method_list:
                    if not method.supports(space_name) or (space_name, reading, device, method.name, k, seed) in done:
                        continue
                    rows.append((space_name, reading, device, method.name, k, seed,
                                 *_scores(method, context, device, samples, held_out, measured, seed)))
                append_rows(out / RAW_FILE, COLUMNS, rows)
                written += len(rows)
                count += 1
                if progress is not None:
                    progress(count, total, f"{space_name}: {device} ({reading.replace('_', ' ')})")
        targets.append(device)
    if report:
        from .lodo_report import write_lodo_report

        write_lodo_report(out)
    return LodoResult(out, written, targets)


def fold_base(space: SearchSpace, table: SpaceTable, device: str, config: TrainConfig = CONFIG) -> LatencyPredictor:
    """The base of `device`'s fold: pre-trained on every other device of `table`."""
    others = [d for d in sorted(table.latencies) if d != device]
    with np.errstate(divide="ignore"):
        reference = LatencyTable(table.keys, others, np.log(table.matrix(others)).astype(np.float32))
    return LatencyPredictor.fit(space, reference, config=config)


@dataclass(frozen=True)
class Fold:
    """One target of the bench: a device of the space's table and the base pre-trained without it."""

    space: SearchSpace
    table: SpaceTable
    device: str
    base: LatencyPredictor


def folds(space_name: str, every: int = 1, config: TrainConfig = CONFIG) -> Iterator[Fold]:
    """Every `every`-th device of the space's published table, in name order, as the target of a
    fold (`fold_base`): what the validation scripts under benchmarks/ iterate over."""
    table = load_space_table(find_datasets(), space_name)
    space = memoised_space(table.space, table.keys)
    for device in sorted(table.latencies)[::every]:
        yield Fold(space, table, device, fold_base(space, table, device, config))


def _shares_networks(table: SpaceTable) -> bool:
    """Whether some keys of the table build one network (so a device can be read per network)."""
    space = table.space
    return len({space.network_key(key) for key in table.keys}) < len(table.keys)


def read_device(reading: str, space: SearchSpace, table: SpaceTable, device: str,
                base: LatencyPredictor) -> tuple[TaskContext, dict[str, float]]:
    """What the methods get under `reading`: the task context (the train devices' latencies, per
    network or as timed) and the target's latency of each key it measured."""
    others = tuple(d for d in sorted(table.latencies) if d != device)
    truth = table.device_truth(device)
    if reading == "as_timed":
        return TaskContext(space, others, base, {key: i for i, key in enumerate(table.keys)},
                           table.matrix(others), per_network=None), truth
    reference = base.reference
    if reference is None or reference.table.keys != table.keys:
        raise ValueError("the per-network reading needs the fold base's measured table, over the space table's keys")
    with np.errstate(divide="ignore"):
        own_table = LatencyTable(table.keys, [device], np.log(table.matrix([device])).astype(np.float32))
    # the target's networks are the references': the same keys, so the base's grouping serves
    own = MeasuredReference(space, own_table, reference.network_keys, reference.network_of_row, reference.dead)
    network_ms = np.exp(own.network_log_ms[:, 0].astype(np.float64))
    network_of = {key: int(reference.network_of_row[row]) for key, row in reference.row.items()}
    context = TaskContext(space, others, base, network_of, np.exp(reference.network_log_ms.astype(np.float64)),
                          per_network=True)
    return context, {key: float(network_ms[network_of[key]]) for key in truth}


def held_out_keys(keys: list[str], picked: list[str], network_key: Callable[[str], str] | None) -> list[str]:
    """The keys scored: those not picked, or read per network (`network_key`), those whose
    network was not measured."""
    if network_key is None:
        chosen = set(picked)
        return [key for key in keys if key not in chosen]
    measured = {network_key(key) for key in picked}
    return [key for key in keys if network_key(key) not in measured]


def _scores(method: Method, context: TaskContext, device: str, samples: dict[str, float], keys: list[str],
            truth: np.ndarray, seed: int) -> tuple[str, ...]:
    prediction = method.predict(context, device, samples, keys, seed)
    ms = prediction.ms
    values = [metrics.spearman(ms, truth), metrics.kendall(ms, truth)]
    values += [float("nan")] * 2 if method.ranks_only else [metrics.mape(ms, truth), metrics.within(ms, truth)]
    if prediction.std is not None:
        values += [metrics.coverage(ms, prediction.std, truth), metrics.calibration_rho(ms, prediction.std, truth)]
    else:
        values += [float("nan")] * 2
    values.append(prediction.extras.get("measured_share_min", float("nan")))
    return tuple("" if np.isnan(v) else f"{v:.6f}" for v in values)


def _done(path: Path) -> set[tuple[str, str, str, str, int, int]]:
    if not path.is_file():
        return set()
    with open(path, newline="") as handle:
        rows = csv.DictReader(handle)
        if rows.fieldnames is not None and "reading" not in rows.fieldnames:
            raise ValueError(f"{path} was written before the per-network reading: rerun with --fresh")
        return {(r["space"], r["reading"], r["device"], r["method"], int(r["k"]), int(r["seed"])) for r in rows}
